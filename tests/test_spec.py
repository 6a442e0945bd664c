"""PermutationSpec serialisation and editing, permutations, apply() conventions and bad input."""

import json

import pytest
import torch
from torch import nn

import permgraph
from permgraph import models


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return models.create("mlp", in_features=6, width=8, depth=3, num_classes=3)


@pytest.fixture(scope="module")
def mlp_spec(mlp):
    return permgraph.trace(mlp)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.create("resnet20", width_multiplier=0.5)


@pytest.fixture(scope="module")
def resnet_spec(resnet):
    return permgraph.trace(resnet)


def test_convention_new_equals_old_indexed_by_p(mlp, mlp_spec):
    perm = permgraph.random_permutation(mlp_spec, 3)
    new = permgraph.apply(mlp.state_dict(), mlp_spec, perm)
    g0 = mlp_spec.axes["layers.0.weight"][0]
    g1 = mlp_spec.axes["layers.2.weight"][0]
    old = mlp.state_dict()
    assert torch.equal(new["layers.0.weight"], old["layers.0.weight"][perm[g0]])
    assert torch.equal(new["layers.0.bias"], old["layers.0.bias"][perm[g0]])
    assert torch.equal(new["layers.2.weight"], old["layers.2.weight"][perm[g1]][:, perm[g0]])


def test_compose_and_inverse_round_trip(resnet, resnet_spec):
    sd = resnet.state_dict()
    p = permgraph.random_permutation(resnet_spec, 1)
    q = permgraph.random_permutation(resnet_spec, 2)
    two_steps = permgraph.apply(permgraph.apply(sd, resnet_spec, p), resnet_spec, q)
    one_step = permgraph.apply(sd, resnet_spec, permgraph.compose(p, q))
    for k in sd:
        assert torch.equal(two_steps[k], one_step[k])
    back = permgraph.apply(permgraph.apply(sd, resnet_spec, p), resnet_spec, permgraph.inverse(p))
    for k in sd:
        assert torch.equal(back[k], sd[k])
    assert permgraph.compose(p, permgraph.inverse(p)).is_identity()
    ident = permgraph.apply(sd, resnet_spec, permgraph.identity(resnet_spec))
    assert all(torch.equal(ident[k], sd[k]) for k in sd)


def test_apply_to_model_returns_new_model_and_leaves_caller_untouched(resnet, resnet_spec):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    perm = permgraph.random_permutation(resnet_spec, 0)
    out = permgraph.apply(resnet, resnet_spec, perm)
    assert isinstance(out, type(resnet)) and out is not resnet
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    changed = [k for k, v in out.state_dict().items() if not torch.equal(v, before[k])]
    convs = [k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert set(convs) <= set(changed) and len(convs) == 19  # (fresh BatchNorm vectors are constant)
    # integer buffers are carried over as they are
    assert torch.equal(out.state_dict()["bn1.num_batches_tracked"], before["bn1.num_batches_tracked"])


def test_partial_state_dict_such_as_a_mask_is_permuted_key_by_key(resnet, resnet_spec):
    sd = resnet.state_dict()
    mask = {k: sd[k].abs() > sd[k].abs().median() for k in ["layer1.0.conv1.weight", "fc.weight"]}
    perm = permgraph.random_permutation(resnet_spec, 5)
    pm = permgraph.apply(mask, resnet_spec, perm)
    full = permgraph.apply(sd, resnet_spec, perm)
    assert set(pm) == set(mask) and pm["fc.weight"].dtype == torch.bool
    for k in mask:
        assert torch.equal(pm[k], full[k].abs() > sd[k].abs().median())


def test_json_round_trip_preserves_everything(resnet, resnet_spec):
    text = resnet_spec.to_json()
    spec2 = permgraph.PermutationSpec.from_json(text)
    assert spec2.axes == resnet_spec.axes
    assert spec2.group_sizes() == resnet_spec.group_sizes()
    assert spec2.fingerprint() == resnet_spec.fingerprint()
    perm = permgraph.random_permutation(resnet_spec, 0)
    a = permgraph.apply(resnet.state_dict(), resnet_spec, perm)
    b = permgraph.apply(resnet.state_dict(), spec2, perm)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(spec2.to_json()) == json.loads(text)


def test_hand_edited_spec_freezes_a_group_and_is_reverified(resnet, resnet_spec):
    d = json.loads(resnet_spec.to_json())
    target = resnet_spec.axes["layer1.0.conv1.weight"][0]
    for g in d["groups"]:
        if g["id"] == target:
            g["frozen"] = True
    spec2 = permgraph.PermutationSpec.from_json(json.dumps(d), model=resnet)
    assert target not in spec2.groups
    assert spec2.axes["layer1.0.conv1.weight"][0] == resnet_spec.groups[target].size
    assert any("by hand" in f.reason for f in spec2.frozen)
    assert len(spec2.groups) == len(resnet_spec.groups) - 1
    assert permgraph.check_equivalence(resnet, spec2).ok


def test_loaded_spec_against_another_model_is_a_clear_error(resnet_spec):
    other = models.create("resnet20", width_multiplier=1)
    with pytest.raises(permgraph.SpecMismatchError, match="shape"):
        permgraph.PermutationSpec.from_json(resnet_spec.to_json(), model=other)
    with pytest.raises(permgraph.SpecMismatchError):
        permgraph.apply(other, resnet_spec, permgraph.identity(resnet_spec))


def test_freeze_patterns_keep_the_classifier_in_place(resnet):
    spec = permgraph.trace(resnet, freeze=["fc.*"])
    assert all(isinstance(t, int) for t in spec.axes["fc.weight"])
    assert any("freeze" in f.reason for f in spec.frozen)
    full = permgraph.trace(resnet)
    assert len(spec.groups) == len(full.groups) - 1
    assert permgraph.check_equivalence(resnet, spec).ok


def test_trace_leaves_the_callers_model_as_it_was(resnet):
    resnet.train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    permgraph.trace(resnet)
    assert resnet.training and all(m.training for m in resnet.modules())
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    resnet.eval()


def test_permutation_validation():
    with pytest.raises(ValueError, match="not a bijection"):
        permgraph.Permutation({"g0": [0, 0, 1]})
    with pytest.raises(ValueError, match="1-D"):
        permgraph.Permutation({"g0": [[0, 1]]})


def test_bad_permutations_and_state_dicts_are_clear_errors(mlp, mlp_spec):
    with pytest.raises(permgraph.SpecMismatchError, match="has 3 entries"):
        permgraph.apply(mlp.state_dict(), mlp_spec, {"g0": torch.arange(3)})
    with pytest.raises(permgraph.SpecMismatchError, match="not in the spec"):
        permgraph.apply({"nope.weight": torch.zeros(2)}, mlp_spec, permgraph.identity(mlp_spec))
    with pytest.raises(TypeError):
        permgraph.apply([1, 2], mlp_spec, permgraph.identity(mlp_spec))


def test_report_and_graph(resnet_spec):
    rep = resnet_spec.report()
    assert "permutable tensors" in rep and "verification: passed" in rep and "model output" in rep
    g = resnet_spec.graph
    for gid, grp in resnet_spec.groups.items():
        assert g.degree(gid) >= len({m.axis for m in grp.members})
    # activation axes are part of the traced graph, and every group is reached from some parameter
    assert any(d.get("kind") == "activation" for _, d in g.nodes(data=True))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_are_aliases():
    m = Tied()
    spec = permgraph.trace(m, torch.randn(3, 4))
    assert spec.aliases == {"b.weight": "a.weight"}
    out = permgraph.apply(m, spec, permgraph.random_permutation(spec, 0))
    x = torch.randn(5, 4)
    assert torch.allclose(out(x), m(x), atol=1e-6)


@pytest.mark.parametrize("shape,dims", [((5, 7), (0, 1)), ((5, 7), (1,)), ((4, 6, 3), (0, 2)), ((4, 6, 3), (1,)),
                                        ((6, 4, 3, 3), (0, 1)), ((2, 3, 4, 5), (0, 1, 2, 3))])
def test_take_reorders_each_moved_dim_like_index_select(shape, dims):
    """``take`` (one gather for several moved dims ending at the last one, else index_select per dim)
    gives exactly what one index_select per moved dim gives."""
    from permgraph.permutation import take

    gen = torch.Generator().manual_seed(len(shape) * 10 + len(dims))
    t = torch.randn(shape, generator=gen)
    moved = {d: torch.randperm(shape[d], generator=gen) for d in dims}
    want = t
    for d, i in moved.items():
        want = want.index_select(d, i)
    got = take(t, moved)
    assert torch.equal(got, want)
    assert take(t, {}) is t
