"""The zoo kind: one protocol across architectures, failures reported per model, resumable, plan-complete;
and the data and model options it relies on (resized / 3-channel images, model classes by name)."""

import pytest
import torch
from _runs import counting, run_twice
from permgraph.experiments.common import Context
from permgraph.experiments.spec import SpecError
from permgraph.experiments.store import Store, read_json

import permgraph
from permgraph import experiments

ZOO = {
    "kind": "zoo", "name": "tinyzoo",
    "models": [
        {"label": "mlp", "name": "mlp", "kwargs": {"in_features": 768, "width": 32, "depth": 2}},
        {"label": "vit", "name": "timm:vit_tiny_patch16_224",
         "kwargs": {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10},
         "train": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0}, "matching": {"residual": "weight"}},
        {"label": "typo", "name": "timm:resnett18"},
        {"label": "wrong_input", "name": "mlp", "kwargs": {"in_features": 10}},
    ],
    "data": {"name": "digits", "resize": 16, "channels": 3},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [[0, 1]],
    "matching": {"num_samples": 200},
    "barrier": {"alphas": 3, "subset": 200, "batch_size": 200},
}


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    return run_twice(ZOO, tmp_path_factory.mktemp("zoo"))


def test_zoo_measures_every_model_and_reports_the_ones_that_fail(zoo_run):
    run_dir = zoo_run["run_dir"]
    res = read_json(run_dir / "results.json")
    models = res["models"]
    assert set(models) == {"mlp", "vit", "typo", "wrong_input"}
    for lb in ("mlp", "vit"):
        e = models[lb]
        assert "error" not in e
        assert e["coverage"]["permutable"] > 0.99 and e["coverage"]["verification"] == "passed"
        (pair,) = e["pairs"]
        assert pair["seeds"] == [0, 1]
        for arm in ("none", "weight", "activation"):
            for split in ("train", "test"):
                curve = pair["barriers"][arm][split]
                assert len(curve["alphas"]) == 3 and 0.0 <= curve["barrier"]["error"] <= 1.0
                assert e["summary"][arm][split]["error"]["n"] == 1
        # the trained endpoints are clearly better than chance (10 classes)
        assert max(pair["barriers"]["none"]["test"]["values"]["error"][i] for i in (0, -1)) < 0.6
        c = e["controls"]["self_permuted"]
        assert c["mismatched_units"] == 0 and c["barrier_aligned"] == {"loss": 0.0, "error": 0.0}
    assert models["vit"]["train"]["optimizer"] == "adamw" and models["mlp"]["train"]["optimizer"] == "sgd"
    assert models["typo"]["error"]["phase"] == "build" and models["typo"]["error"]["type"] == "UnknownNameError"
    assert "did you mean 'resnet18'" in models["typo"]["error"]["message"]
    assert models["wrong_input"]["error"]["phase"] == "trace"
    assert models["typo"]["summary"] is None and models["typo"]["pairs"][0]["error"]["phase"] == "build"
    # wall times are kept out of results.json, in timing.json
    assert "timing" not in (run_dir / "results.json").read_text()
    timing = read_json(run_dir / "timing.json")
    assert timing["vit"]["pair_0_1"]["train"] > 0 and timing["vit"]["pair_0_1"]["align_weight"] > 0
    report = (run_dir / "report.md").read_text()
    assert "| vit | 99.9% |" in report and "## Models that did not run" in report
    assert "**typo** (`timm:resnett18`) failed at *build*" in report
    assert (run_dir / "zoo_barriers.png").stat().st_size > 1000


def test_zoo_runs_in_the_command_line_list_and_report(zoo_run, tmp_path, capsys):
    import yaml

    from permgraph.cli import main

    run_dir = zoo_run["run_dir"]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(ZOO))
    assert main(["list", str(tmp_path), "--out", str(run_dir.parent.parent)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "zoo.yaml" in ln]
    assert line.split()[1:] == ["zoo", run_dir.name, "finished"]
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == before


def test_zoo_rerun_does_no_work_and_gives_the_same_bytes(zoo_run):
    assert zoo_run["work_first"]["train"] == 4
    assert zoo_run["work_second"] == {"train": 0, "align": 0, "barrier": 0}
    assert zoo_run["before"] == zoo_run["after"]
    assert zoo_run["text"] == zoo_run["text_again"]


def test_zoo_plan_covers_every_unit_of_the_run(zoo_run, tmp_path):
    """Running the plan's units one by one (as the Ray executor does, each with a fresh context) leaves the
    final aggregation nothing to compute, and the results are the same bytes as a direct run's."""
    spec = experiments.parse(ZOO)
    store = Store(tmp_path)
    names, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as experiments.run does (results are byte-identical for one thread count)
    try:
        for name, fn, deps in experiments.runner("zoo").plan(Context(spec, store, progress=False)):
            assert set(deps) <= set(names)
            fn(Context(spec, store, progress=False))
            names.append(name)
    finally:
        torch.set_num_threads(threads)
    assert {"mlp__model", "mlp__train_0", "mlp__train_1", "mlp__pair_0_1", "mlp__control"} <= set(names)
    calls = dict.fromkeys(("train", "align", "barrier"), 0)
    with counting(calls):
        run_dir = experiments.run(spec, out=tmp_path, progress=False)
    assert calls == {"train": 0, "align": 0, "barrier": 0}
    assert (run_dir / "results.json").read_bytes() == zoo_run["text"]


def test_zoo_spec_errors_name_the_model():
    with pytest.raises(SpecError, match="labels must be unique; repeated: \\['a'\\]"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp"}, {"label": "a", "name": "mlp"}]})
    with pytest.raises(SpecError, match=r"models\[a\]\.train: unknown fields \['epochz'\]"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp", "train": {"epochz": 3}}]})
    with pytest.raises(SpecError, match=r"models\[a\]\.train: lr"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp", "train": {"lr": -1}}]})
    with pytest.raises(SpecError, match=r"models\[a\]\.matching: unknown fields \['residuals'\]"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp", "matching": {"residuals": "weight"}}]})
    with pytest.raises(SpecError, match=r"models\[a\]\.matching: methods are the table's columns"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp", "matching": {"methods": ["weight"]}}]})
    with pytest.raises(SpecError, match=r"models\[a\]\.matching: residual"):
        experiments.parse({**ZOO, "models": [{"label": "a", "name": "mlp", "matching": {"residual": "both"}}]})


def test_a_model_may_set_its_own_matching():
    """A model's matching settings go over the spec's for that model only (a transformer's residual stream
    by weights, say); the others keep the spec's."""
    spec = experiments.parse(ZOO)
    vit, mlp = (next(m for m in spec.models if m.label == x) for x in ("vit", "mlp"))
    assert spec.pair_spec(vit).matching.residual == "weight" and spec.pair_spec(vit).matching.num_samples == 200
    assert spec.pair_spec(mlp).matching.residual == "activation"


def test_zoo_presets_validate_and_name_known_models():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "specs"
    for path in (root / "cpu" / "zoo_mnist5k.yaml", root / "paper" / "zoo_cifar10.yaml"):
        spec = experiments.load(path)
        assert spec.kind == "zoo" and len(spec.models) >= 10
        for m in spec.models:
            with torch.random.fork_rng(devices=[]):
                permgraph.models.create(m.name, **m.kwargs)  # every preset model builds


# ---------------------------------------------------------------------------------------------- data, models
def test_resized_three_channel_images():
    plain = permgraph.data.get("digits")
    data = permgraph.data.get("digits", resize=16, channels=3)
    assert data.info.input_shape == (3, 16, 16) and plain.info.input_shape == (1, 8, 8)
    x = data.test.tensors[0]
    assert x.shape == (360, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])  # the gray channel, repeated
    # the same images, larger: resized back down to 8 px they correlate closely with the originals
    back = torch.nn.functional.interpolate(x[:, :1], size=(8, 8), mode="bilinear", antialias=True).flatten()
    assert torch.corrcoef(torch.stack([back, plain.test.tensors[0].flatten()]))[0, 1] > 0.9
    assert torch.equal(data.test.tensors[1], plain.test.tensors[1])
    aug = permgraph.data.get("digits", resize=16, augment=True)
    assert aug.train[0][0].shape == (1, 16, 16) and aug.subset("train", 5).tensors[0].shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match="apply to images"):
        permgraph.data.get("fake", input_shape=(12,), resize=8)
    with pytest.raises(ValueError, match="only a single \\(gray\\) channel can be repeated, and this data set has 3"):
        permgraph.data.get("fake", input_shape=(3, 8, 8), channels=4)


def test_model_classes_by_name_take_every_size():
    mixer = permgraph.models.create("timm:MlpMixer", num_classes=10, img_size=16, patch_size=4, num_blocks=2,
                                    embed_dim=32)
    assert len(mixer.blocks) == 2 and mixer(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    dense = permgraph.models.create("torchvision:DenseNet", growth_rate=8, block_config=(2, 2),
                                    num_init_features=16, num_classes=10)
    assert dense(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(TypeError, match="the variant fixes that argument: name its model class instead"):
        permgraph.models.create("timm:mixer_s16_224", num_blocks=2)


def test_store_keys_leave_out_fields_at_their_defaults(tmp_path):
    """Spelling out a default (or adding a field whose default changes nothing) keeps the stored networks
    and IMP chains: their keys, like the run hash, omit fields at their defaults."""
    from permgraph.experiments import imp

    base = {"kind": "imp", "name": "k", "model": {"name": "mlp"}, "data": {"name": "digits"}, "seeds": [[0, 1]]}
    spelled = {**base, "model": {"name": "mlp", "kwargs": {}},
               "data": {"name": "digits", "normalize": True, "resize": None, "channels": None},
               "train": {"epochs": 10, "gamma": 0.1, "milestones": []}}
    ctxs = [Context(experiments.parse(d), Store(tmp_path), progress=False) for d in (base, spelled)]
    assert ctxs[0]._network_key(0, [], {})[2] == ctxs[1]._network_key(0, [], {})[2]
    assert imp.imp_key(ctxs[0], 0) == imp.imp_key(ctxs[1], 0)
    changed = Context(experiments.parse({**base, "train": {"epochs": 3}}), Store(tmp_path), progress=False)
    assert changed._network_key(0, [], {})[2] != ctxs[0]._network_key(0, [], {})[2]
