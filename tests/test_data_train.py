"""Data registry and trainer: real small data sets, determinism, resume, checkpoints, masks."""

import dataclasses
import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

import permgraph
from permgraph import data, models
from permgraph.data import DatasetMissingError
from permgraph.errors import FileFormatError
from permgraph.io import load_state_dict
from permgraph.training import _load_train_state, _save_train_state


def test_real_small_data_sets_load_offline_with_deterministic_splits():
    d = data.get("digits")
    assert (len(d.train), len(d.test)) == (1437, 360) and d.info.input_shape == (1, 8, 8)
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and 0 <= int(y) < 10
    d2 = data.get("digits")
    assert torch.equal(d.train.tensors[0], d2.train.tensors[0])
    assert not torch.equal(d.train.tensors[1], data.get("digits", seed=1).train.tensors[1])
    m = data.get("mnist1d")
    assert (len(m.train), len(m.test)) == (4000, 1000) and m.info.input_shape == (40,)
    assert abs(float(m.train.tensors[0].mean())) < 1e-4  # standardised
    f = data.get("fake", input_shape=(3, 4, 4), num_classes=3)
    assert f.train[0][0].shape == (3, 4, 4)


def test_subset_is_the_first_examples_without_augmentation():
    d = data.get("digits", augment=True)
    sub = d.subset("train", 10)
    assert len(sub) == 10
    assert torch.equal(sub[3][0], d.train_eval[3][0])
    batches = list(d.loader("train", 4, subset=10))
    assert sum(len(b[1]) for b in batches) == 10


def test_missing_data_folder_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(DatasetMissingError, match="download=True"):
        data.get("cifar10", root=tmp_path)
    with pytest.raises(DatasetMissingError, match="root="):
        data.get("cifar10")
    with pytest.raises(ValueError, match="available"):
        data.get("imagenet-21k")


def _mlp():
    return models.create("mlp", in_features=64, width=32, depth=2)


def test_training_learns_and_writes_checkpoints_and_metrics(tmp_path):
    d = data.get("digits")
    out = permgraph.train(_mlp, d, epochs=3, lr=0.05, batch_size=64, init_seed=0, data_seed=0,
                          checkpoints=[0, 1, 3], checkpoint_dir=str(tmp_path), progress=False)
    assert isinstance(out, permgraph.TrainResult) and out.steps == 3 * 23 and not out.checkpoint_states
    assert re.fullmatch(r"TrainResult\(steps=69, epochs=3, test_error=0\.\d+, checkpoints=\[0, 1, 3\]\)", repr(out))
    assert out.final == out.history[-1] and out.final is not out.history[-1]
    with pytest.raises(TypeError):  # a result object, not a dict
        out["model"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.steps = 0
    assert sorted(out.checkpoints) == [0, 1, 3]
    for p in out.checkpoints.values():
        assert os.path.exists(p)
    lines = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["test_error"] < 0.2  # digits is easy: measured ~0.05 after 3 epochs
    sd0 = load_state_dict(out.checkpoints[0])
    torch.manual_seed(0)
    assert torch.equal(sd0["layers.0.weight"], _mlp().state_dict()["layers.0.weight"])


def test_init_seed_and_data_seed_are_independent():
    d = data.get("digits")
    kw = dict(epochs=1, lr=0.05, batch_size=64, progress=False)
    a = permgraph.train(_mlp, d, init_seed=0, data_seed=0, **kw).model.state_dict()
    b = permgraph.train(_mlp, d, init_seed=0, data_seed=1, **kw).model.state_dict()
    c = permgraph.train(_mlp, d, init_seed=0, data_seed=0, **kw).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], b["layers.0.weight"])


def test_a_train_config_and_keyword_settings_give_the_same_run():
    d = data.get("digits")
    config = permgraph.TrainConfig(epochs=1, lr=0.05, batch_size=64, schedule="cosine", checkpoints=[1, 0])
    assert config.checkpoints == (0, 1) and config.replace(lr=0.01).lr == 0.01 and config.lr == 0.05
    a = permgraph.train(_mlp, d, config, init_seed=0, progress=False)
    b = permgraph.train(_mlp, d, epochs=1, lr=0.05, batch_size=64, schedule="cosine", checkpoints=[0, 1],
                        init_seed=0, progress=False)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.history == b.history
    assert sorted(a.checkpoint_states) == [0, 1]
    # a keyword overrides the config's field; the config itself is unchanged
    c = permgraph.train(_mlp, d, config, lr=0.01, init_seed=0, progress=False)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"] and config.lr == 0.05
    with pytest.raises(TypeError, match="epochz.*TrainConfig"):
        permgraph.train(_mlp, d, epochz=1, progress=False)
    with pytest.raises(TypeError, match="unknown training setting"):
        config.replace(learning_rate=0.1)
    for bad, match in [(dict(epochs=0), "epochs must be a positive int"), (dict(epochs=1, steps=5), "exactly one"),
                       (dict(epochs=1, batch_size=0.5), "batch_size"), (dict(epochs=1, optimizer="lion"), "optimizer"),
                       (dict(epochs=1, schedule="linear"), "schedule")]:
        with pytest.raises(ValueError, match=match):
            permgraph.train(_mlp, d, progress=False, **bad)


class _Stop(Exception):
    """Stands for a crash or a kill."""


class _DropoutMLP(nn.Module):
    """A small MLP with dropout, so that training draws from the global generator. Its ``stop_at``-th
    forward pass in training mode raises ``_Stop``: an interruption in the middle of an epoch."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                raise _Stop
        return self.net(x)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, optimizer, where):
    d = data.get("digits")
    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, batch_size=64, init_seed=0,
              data_seed=3, progress=False, schedule="step", milestones=[2], weight_decay=1e-4)
    full = permgraph.train(_DropoutMLP, d, epochs=3, **kw).model.state_dict()

    def interrupt(ev):
        if ev["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        if where == "epoch end":  # right after the state of epoch 2 was saved
            permgraph.train(_DropoutMLP, d, epochs=3, checkpoint_dir=str(tmp_path), callbacks=[interrupt], **kw)
        else:  # in step 30 of 3 x 23, during epoch 2: the run resumes from the state of epoch 1
            permgraph.train(lambda: _DropoutMLP(stop_at=30), d, epochs=3, checkpoint_dir=str(tmp_path), **kw)
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors", "metrics.jsonl"]  # no pickle, no temp file
    resumed = permgraph.train(_DropoutMLP, d, epochs=3, checkpoint_dir=str(tmp_path), **kw)
    assert resumed.steps == 3 * 23
    # bit-identical: the weights, the optimizer's state and the generator (dropout) all resumed exactly
    assert all(torch.equal(full[k], resumed.model.state_dict()[k]) for k in full)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def _same(a, b) -> bool:
    """Equal values of the same types; tensors bit for bit, with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
], ids=["sgd-momentum", "adam", "adamw"])
def test_the_resume_state_holds_the_optimizer_state_exactly(tmp_path, make_optimizer):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    def build():
        with torch.random.fork_rng(devices=[]):  # zoo models initialise from the global generator
            torch.manual_seed(0)
            model = _mlp()
        return model, make_optimizer(model.parameters())

    def step(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model, opt = build()
    for _ in range(3):
        step(model, opt)
    path = str(tmp_path / "last.safetensors")
    history, saved = [{"epoch": 1, "step": 3, "lr": 0.1, "train_loss": 1 / 3}], {0: "ckpt_epoch0.safetensors"}
    with torch.random.fork_rng(devices=[]):  # loading sets the generator
        _save_train_state(path, model, opt, torch.device("cpu"), 3, history, saved)
        model2, opt2 = build()
        assert _load_train_state(path, model2, opt2, torch.device("cpu")) == (3, history, saved)
    assert _same(opt.state_dict(), opt2.state_dict())  # momentum buffers, moments, step counts, groups
    assert _same(model.state_dict(), model2.state_dict())
    step(model, opt), step(model2, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    with safe_open(path, "pt") as f:  # the layout documented in _save_train_state
        doc = json.loads(f.metadata()["permgraph.train_state"])
        names = set(f.keys())
    assert doc["format_version"] == 1 and doc["step"] == 3 and doc["optimizer"]["class"] == type(opt).__name__
    assert "rng/cpu" in names and {f"model/{k}" for k in model.state_dict()} <= names
    assert {f"optimizer/0/{k}" for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)} <= names


def test_masked_weights_stay_exactly_zero_through_momentum_and_weight_decay():
    d = data.get("digits")
    torch.manual_seed(0)
    m = _mlp()
    g = torch.Generator().manual_seed(0)
    mask = {"layers.0.weight": torch.rand(m.layers[0].weight.shape, generator=g) > 0.7,
            "layers.2.weight": torch.rand(m.layers[2].weight.shape, generator=g) > 0.5}
    out = permgraph.train(m, d, steps=40, lr=0.1, momentum=0.9, weight_decay=5e-3, mask=mask, progress=False)
    sd = out.model.state_dict()
    for k, mk in mask.items():
        assert torch.all(sd[k][~mk] == 0)
        assert torch.all(sd[k][mk] != 0)
    with pytest.raises(ValueError, match="shape"):
        permgraph.train(_mlp(), d, steps=1, mask={"layers.0.weight": torch.ones(2, 2, dtype=torch.bool)},
                        progress=False)
    with pytest.raises(ValueError, match="outside the run"):
        permgraph.train(_mlp(), d, epochs=1, checkpoints=[5], progress=False)


def test_train_leaves_the_global_generator_as_it_found_it():
    d = data.get("digits")
    kw = dict(epochs=1, lr=0.05, batch_size=64, progress=False)
    before = torch.get_rng_state()
    a = permgraph.train(_DropoutMLP, d, init_seed=3, **kw).model.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = permgraph.train(_DropoutMLP, d, init_seed=3, **kw).model.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what train did before it forked: seed, build and train, all drawing from one generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        c = permgraph.train(_DropoutMLP(), d, **kw).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


class _Payload:
    """Unpickling this creates the file ``marker``: a stand-in for running any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["last.pt", "last.safetensors"])
def test_a_malicious_pickle_in_the_checkpoint_dir_is_never_unpickled(tmp_path, name):
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()  # the payload does run when unpickled
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": _Payload(marker), "step": 0}, run_dir / name)  # torch.load(weights_only=False) runs it
    d = data.get("digits")
    kw = dict(epochs=1, lr=0.05, batch_size=64, init_seed=0, progress=False, checkpoint_dir=str(run_dir))
    if name == "last.pt":
        with pytest.warns(UserWarning, match="old pickle-based training state: it is not loaded.*restarts"):
            out = permgraph.train(_mlp, d, **kw)
        assert out.steps == 23 and (run_dir / "last.safetensors").exists()
        with pytest.warns(UserWarning, match="resumes from last.safetensors"):
            again = permgraph.train(_mlp, d, **kw)
        assert again.steps == 23 and again.history == out.history
    else:
        with pytest.raises(FileFormatError, match=re.escape(str(run_dir / name)) + ".*delete it"):
            permgraph.train(_mlp, d, **kw)
    assert not marker.exists()


def test_an_unusable_resume_state_is_a_clear_error_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    d = data.get("digits")
    kw = dict(epochs=1, lr=0.05, batch_size=64, init_seed=0, progress=False, checkpoints=[0])
    permgraph.train(_mlp, d, checkpoint_dir=str(tmp_path / "good"), **kw)
    good = (tmp_path / "good" / "last.safetensors").read_bytes()
    save_file({}, str(tmp_path / "v99"), metadata={"permgraph.train_state": json.dumps({"format_version": 99})})
    cases = {  # name: (file content, factory, optimizer, what the message says)
        "truncated": (good[:len(good) // 2], _mlp, "sgd", "is truncated or not a safetensors file"),
        "checkpoint": ((tmp_path / "good" / "ckpt_epoch0.safetensors").read_bytes(), _mlp, "sgd",
                       "is not a permgraph training state"),
        "newer": ((tmp_path / "v99").read_bytes(), _mlp, "sgd", "has format version 99"),
        "other_model": (good, lambda: models.create("mlp", in_features=64, width=16, depth=2), "sgd",
                        "holds the weights of another model"),
        "other_optimizer": (good, _mlp, "adam", "was written with the SGD optimizer"),
    }
    for case, (content, factory, optimizer, why) in cases.items():
        path = tmp_path / case / "last.safetensors"
        path.parent.mkdir()
        path.write_bytes(content)
        with pytest.raises(FileFormatError, match=re.escape(str(path)) + f" {why}.*delete it"):
            permgraph.train(factory, d, checkpoint_dir=str(path.parent), **{**kw, "optimizer": optimizer})
        assert path.read_bytes() == content  # left for the user to look at
