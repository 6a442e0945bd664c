"""Data registry and trainer: real small data sets, determinism, resume, checkpoints, masks."""

import json
import os

import pytest
import torch

import permgraph
from permgraph import data, models
from permgraph.data import DatasetMissingError


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
    assert sorted(out["checkpoints"]) == [0, 1, 3]
    for p in out["checkpoints"].values():
        assert os.path.exists(p)
    lines = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["test_error"] < 0.2  # digits is easy: measured ~0.05 after 3 epochs
    sd0 = permgraph.train.__globals__["load_state_dict"](out["checkpoints"][0])
    torch.manual_seed(0)
    assert torch.equal(sd0["layers.0.weight"], _mlp().state_dict()["layers.0.weight"])


def test_init_seed_and_data_seed_are_independent():
    d = data.get("digits")
    kw = dict(epochs=1, lr=0.05, batch_size=64, progress=False)
    a = permgraph.train(_mlp, d, init_seed=0, data_seed=0, **kw)["model"].state_dict()
    b = permgraph.train(_mlp, d, init_seed=0, data_seed=1, **kw)["model"].state_dict()
    c = permgraph.train(_mlp, d, init_seed=0, data_seed=0, **kw)["model"].state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], b["layers.0.weight"])


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    d = data.get("digits")
    kw = dict(lr=0.05, batch_size=64, init_seed=0, data_seed=3, progress=False, schedule="step",
              milestones=[2], weight_decay=1e-4)
    full = permgraph.train(_mlp, d, epochs=3, **kw)["model"].state_dict()

    class Stop(Exception):
        pass

    def interrupt(ev):
        if ev["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        permgraph.train(_mlp, d, epochs=3, checkpoint_dir=str(tmp_path), callbacks=[interrupt], **kw)
    resumed = permgraph.train(_mlp, d, epochs=3, checkpoint_dir=str(tmp_path), **kw)
    assert resumed["steps"] == 3 * 23
    assert all(torch.equal(full[k], resumed["model"].state_dict()[k]) for k in full)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]


def test_masked_weights_stay_exactly_zero_through_momentum_and_weight_decay():
    d = data.get("digits")
    torch.manual_seed(0)
    m = _mlp()
    g = torch.Generator().manual_seed(0)
    mask = {"layers.0.weight": torch.rand(m.layers[0].weight.shape, generator=g) > 0.7,
            "layers.2.weight": torch.rand(m.layers[2].weight.shape, generator=g) > 0.5}
    out = permgraph.train(m, d, steps=40, lr=0.1, momentum=0.9, weight_decay=5e-3, mask=mask, progress=False)
    sd = out["model"].state_dict()
    for k, mk in mask.items():
        assert torch.all(sd[k][~mk] == 0)
        assert torch.all(sd[k][mk] != 0)
    with pytest.raises(ValueError, match="shape"):
        permgraph.train(_mlp(), d, steps=1, mask={"layers.0.weight": torch.ones(2, 2, dtype=torch.bool)},
                        progress=False)
    with pytest.raises(ValueError, match="outside the run"):
        permgraph.train(_mlp(), d, epochs=1, checkpoints=[5], progress=False)
