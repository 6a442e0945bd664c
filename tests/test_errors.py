"""Errors, not tracebacks: corrupted files name the file, specs remember their inputs, unknown names list
the known ones, and a failing trace prints nothing but one short TraceError."""

import json
import logging

import pytest
import torch
from permgraph.experiments.store import read_json, write_json
from torch import nn

import permgraph
from permgraph import FileFormatError, PermgraphError, TraceError, UnknownNameError
from permgraph.io import load_state_dict, save_state_dict


class HeadFirstMLP(nn.Module):
    """An MLP whose input size cannot be guessed: the first Linear registered is the head (64 -> 10)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)
        self.body = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def _build(factory):
    with torch.random.fork_rng(devices=[]):  # module initialisers draw from the global generator
        torch.manual_seed(0)
        return factory()


@pytest.fixture(scope="module")
def mlp():
    return _build(HeadFirstMLP)


@pytest.fixture(scope="module")
def mlp_spec(mlp):
    return permgraph.trace(mlp, (torch.randn(4, 40, generator=torch.Generator().manual_seed(1)),))


def _corruptions(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[10] ^= 0xFF  # inside the JSON header
    return {"truncated": good[: len(good) // 2], "cut short": good[:-3], "flipped": bytes(flipped),
            "garbage": b"this is not a safetensors file\n" * 4, "empty": b""}


# ---------------------------------------------------------------------------------------------- files
def test_corrupted_alignment_files_name_the_file(mlp, mlp_spec, tmp_path):
    al = permgraph.identity_alignment(mlp_spec)
    path = tmp_path / "ab.safetensors"
    al.save(path)
    assert permgraph.Alignment.load(path, spec=mlp_spec).perm.is_identity()
    good = path.read_bytes()
    for what, data in _corruptions(good).items():
        bad = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(FileFormatError) as info:
            permgraph.Alignment.load(bad)
        msg = str(info.value)
        assert str(bad) in msg and "permgraph.align(...).save(path)" in msg, (what, msg)
        assert len(msg.splitlines()) <= 2, msg
    # a valid safetensors file that is no alignment (a state dict)
    other = tmp_path / "weights.safetensors"
    save_state_dict(mlp.state_dict(), str(other))
    with pytest.raises(FileFormatError, match="not a permgraph alignment") as info:
        permgraph.Alignment.load(other)
    assert str(other) in str(info.value)
    # readable, but its metadata is broken
    from safetensors.torch import save_file

    meta_bad = tmp_path / "meta.safetensors"
    save_file({"g0": torch.arange(3)}, str(meta_bad), metadata={"permgraph_alignment": "{not json", "spec": "{}"})
    with pytest.raises(FileFormatError, match="corrupted") as info:
        permgraph.Alignment.load(meta_bad)
    assert str(meta_bad) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        permgraph.Alignment.load(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(info.value)


def test_corrupted_state_dict_files_name_the_file(mlp, tmp_path):
    path = tmp_path / "final.safetensors"
    save_state_dict(mlp.state_dict(), str(path))
    assert set(load_state_dict(str(path))) == set(mlp.state_dict())
    for what, data in _corruptions(path.read_bytes()).items():
        bad = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(FileFormatError, match="truncated or not a safetensors file") as info:
            load_state_dict(str(bad))
        assert str(bad) in str(info.value), what
        assert isinstance(info.value, PermgraphError) and isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError) as info:
        load_state_dict(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(info.value)


def test_broken_json_files_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": [1, 2, 3], "b": "x"})
    assert read_json(path) == {"a": [1, 2, 3], "b": "x"}
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a crash mid-write (without the atomic rename)
    with pytest.raises(FileFormatError, match=r"not valid JSON \(line \d+ column \d+: ") as info:
        read_json(path)
    assert str(path) in str(info.value) and "delete it and rerun" in str(info.value)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        read_json(path)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        read_json(tmp_path / "units" / "x.json")
    assert "x.json" in str(info.value)


def test_bad_spec_json_says_so_and_names_the_source(mlp_spec, tmp_path):
    text = mlp_spec.to_json()
    with pytest.raises(FileFormatError, match=r"the spec text is not valid spec JSON \(line 1 column 1: "):
        permgraph.PermutationSpec.from_json("not json")
    with pytest.raises(FileFormatError, match="spec.json is not valid spec JSON"):
        permgraph.PermutationSpec.from_json(text[:-10], source="spec.json")
    path = tmp_path / "spec.json"
    mlp_spec.save(path)
    loaded = permgraph.PermutationSpec.load(path)
    assert loaded.fingerprint() == mlp_spec.fingerprint() and loaded.input_shapes == mlp_spec.input_shapes
    d = json.loads(text)
    cases = {
        "truncated": text[: len(text) // 3],
        "wrong version": json.dumps({**d, "version": 99}),
        "no groups": json.dumps({k: v for k, v in d.items() if k != "groups"}),
        "bad shapes": json.dumps({**d, "shapes": {k: [1] for k in d["shapes"]}}),
        "bad group": json.dumps({**d, "groups": [{"id": "g0"}]}),
        "a list": "[1, 2, 3]",
    }
    for what, bad in cases.items():
        path.write_text(bad)
        with pytest.raises(FileFormatError) as info:
            permgraph.PermutationSpec.load(path)
        assert str(path) in str(info.value), (what, str(info.value))
        assert isinstance(info.value, ValueError)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        permgraph.PermutationSpec.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        permgraph.PermutationSpec.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- inputs
def test_check_equivalence_reuses_the_traced_input_shapes(mlp, mlp_spec):
    assert mlp_spec.input_shapes == (((4, 40), "float32"),)
    res = permgraph.check_equivalence(mlp, mlp_spec)  # guessing would give (2, 64): the head's input
    assert res.ok and res.per_group
    frozen = mlp_spec.freeze_keys(["head.*"])
    assert frozen.input_shapes == mlp_spec.input_shapes and len(frozen.groups) < len(mlp_spec.groups)
    assert permgraph.check_equivalence(mlp, frozen).ok
    again = permgraph.PermutationSpec.from_json(mlp_spec.to_json(), model=mlp)  # re-verified on (4, 40)
    assert again.input_shapes == mlp_spec.input_shapes
    assert json.loads(mlp_spec.to_json())["inputs"] == [{"shape": [4, 40], "dtype": "float32"}]


def test_a_spec_without_input_shapes_asks_for_example_inputs(mlp, mlp_spec):
    d = json.loads(mlp_spec.to_json())
    del d["inputs"]  # a spec file from before input shapes were recorded
    old = permgraph.PermutationSpec.from_dict(d)
    assert old.input_shapes == ()
    with pytest.raises(TraceError, match="example_inputs") as info:
        permgraph.check_equivalence(mlp, old)
    assert "mat1 and mat2" in str(info.value) and "HeadFirstMLP" in str(info.value)
    assert len(str(info.value).splitlines()) <= 2
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    assert permgraph.check_equivalence(mlp, old, (x,)).ok


def test_integer_inputs_are_recorded_and_rebuilt():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids)))).sum(1)

    model = _build(Tokens)
    spec = permgraph.trace(model, (torch.tensor([[0, 1, 4], [2, 3, 1]]),))
    assert spec.input_shapes == (((2, 3), "int64"),)
    assert permgraph.check_equivalence(model, spec).ok


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(("name", "expect"), [
    ("timm:not_a_model", "timm.list_models('*not_a_model*')"),
    ("timm:resnet1", "did you mean 'resnet18'"),
    ("torchvision:resnt18", "did you mean 'resnet18'"),
    ("resnet18", "did you mean 'timm:resnet18' or 'torchvision:resnet18'"),
    ("rsnet20", "did you mean 'resnet20'"),
])
def test_unknown_model_names_say_how_to_find_the_right_one(name, expect):
    with pytest.raises(UnknownNameError) as info:
        permgraph.models.create(name)
    msg = str(info.value)
    assert expect in msg and repr(name.split(":")[-1]) in msg, msg
    assert isinstance(info.value, ValueError) and len(msg.splitlines()) == 1


def test_bad_model_kwargs_name_the_model():
    with pytest.raises(TypeError, match=r"cannot build 'mlp' with foo=3: .*'foo'"):
        permgraph.models.create("mlp", foo=3)
    with pytest.raises(TypeError, match=r"cannot build timm:resnet18 with foo=3"):
        permgraph.models.create("timm:resnet18", foo=3)


def test_unknown_data_set_lists_the_available_ones():
    with pytest.raises(UnknownNameError, match=r"unknown data set 'nope'; available: .*mnist1d") as info:
        permgraph.data.get("nope")
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownNameError, match="did you mean 'cifar10'"):
        permgraph.data.get("cifar1")


# ---------------------------------------------------------------------------------------------- tracing
def test_a_failing_trace_prints_nothing_and_says_what_to_do(capfd):
    model = _build(DataDependent)
    handlers = {n: list(logging.getLogger(n).handlers) for n in ("torch", "torch.export", "torch._dynamo")}
    with pytest.raises(TraceError) as info:
        permgraph.trace(model, (torch.ones(2, 4),))
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    msg = str(info.value)
    lines = msg.splitlines()
    assert 2 <= len(lines) <= 6, msg
    assert lines[0].startswith("torch.export could not trace DataDependent: ")
    assert "if x.sum() > 0:" in msg and "test_errors.py" in msg  # where, in the user's code
    assert "torch.where" in msg and "report" in msg
    assert "def forward" in info.value.details  # torch's partial graph is kept, not printed
    assert isinstance(info.value.__cause__, Exception)
    assert handlers == {n: list(logging.getLogger(n).handlers) for n in handlers}  # torch's logging restored


def test_a_trace_on_guessed_inputs_that_do_not_fit_says_to_pass_them(mlp, capfd):
    with pytest.raises(TraceError, match=r"the example inputs were guessed \(\(2, 64\) float32\)") as info:
        permgraph.trace(mlp)
    assert capfd.readouterr().err == ""
    assert len(str(info.value).splitlines()) <= 4


def test_a_successful_trace_passes_other_output_on(capfd):
    model = _build(lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
    spec = permgraph.trace(model)
    assert spec.input_shapes == (((2, 3), "float32"),) and len(spec.groups) == 1
    assert capfd.readouterr().err == ""
