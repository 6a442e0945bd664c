"""Hugging Face transformers models (small configs built offline with the hf: prefix), traced as they come:
key/value caches on, ModelOutput dataclasses as outputs, grouped-query attention and rotary embeddings."""

import pytest
import torch

import permgraph

T = pytest.importorskip("transformers", reason="needs the optional 'transformers' package (pip install 'permgraph[hf]')")

CONFIGS = {
    "gpt2": ("hf:GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)),
    "bert": ("hf:BertForMaskedLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=100, max_position_embeddings=32)),
    "llama_gqa": ("hf:LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                              max_position_embeddings=32)),
}


def _build(key):
    name, kw = CONFIGS[key]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return permgraph.models.create(name, **kw).eval()


@pytest.mark.parametrize("key", list(CONFIGS))
def test_hf_models_trace_as_they_come_and_keep_their_function(key):
    model = _build(key)
    use_cache = getattr(model.config, "use_cache", None)
    spec = permgraph.trace(model)  # example inputs: token ids from the config's vocabulary
    assert getattr(model.config, "use_cache", None) == use_cache  # the cache setting is put back
    assert spec.info["verification"]["status"] == "passed"
    permuted, total = spec.permutable_values()
    assert permuted / total > 0.99  # all but output-only tensors (BERT's vocabulary bias)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    perm = permgraph.random_permutation(spec, 5)
    b = permgraph.apply(model, spec, perm)
    with torch.no_grad():
        out_a, out_b = model(input_ids=ids), b(input_ids=ids)
    assert isinstance(out_a, T.utils.ModelOutput)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=1e-4, atol=1e-5)


def test_hf_planted_permutation_recovered_by_both_methods_with_grouped_query_attention():
    a = _build("llama_gqa")
    spec = permgraph.trace(a)
    perm = permgraph.random_permutation(spec, 3)
    b = permgraph.apply(a, spec, perm)
    inv = perm.inverse()
    xs = [torch.randint(0, 100, (16, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for al in (permgraph.align(a, b, spec=spec, progress=False),
               permgraph.align(a, b, "activation", xs, spec=spec, progress=False)):
        assert all(torch.equal(al.perm[g], inv[g]) for g in spec.groups), al.method


def test_hf_names_and_errors():
    assert type(permgraph.models.create("hf:gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50)).__name__ == "GPT2Model"
    with pytest.raises(permgraph.UnknownNameError, match="did you mean 'gpt2'"):
        permgraph.models.create("hf:gtp2")
    ids = permgraph.models.example_inputs_for(_build("bert"))[0]
    assert ids.dtype == torch.long and ids.shape == (2, 16) and int(ids.max()) < 100
