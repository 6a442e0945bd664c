"""``permgraph.train(..., start_step=k)``: the rest of a schedule (learning rate, data order, epoch
numbering) from step k, as IMP's retraining after rewinding needs; resuming such a run."""

import contextlib

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset

import permgraph
from permgraph import data, models
from permgraph.data import Data
from permgraph.errors import FileFormatError
from permgraph.training import lr_at


class _Recorded(Dataset):
    """A training set that notes which examples are read, in order."""

    def __init__(self, base, seen: list):
        self.base, self.seen = base, seen

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.base[i]


@contextlib.contextmanager
def recording(d):
    """(data whose training reads are recorded, steps): ``steps`` gets one (lr, example indices) per
    optimizer step of any run inside the block."""
    seen, steps = [], []

    def hook(opt, args, kwargs):
        steps.append((opt.param_groups[0]["lr"], tuple(seen)))
        seen.clear()

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield Data(_Recorded(d.train, seen), d.test, d.info), steps
    finally:
        handle.remove()


def fake():
    return data.get("fake", input_shape=(16,), num_classes=4, n_train=200, n_test=64)


def mlp():
    return models.create("mlp", in_features=16, width=24, depth=1, num_classes=4)


# 200 examples in batches of 32: 7 steps per epoch (the last one of 8 examples), 4 epochs = 28 steps;
# one epoch of linear warm-up, then x0.1 after epochs 2 and 3
KW = dict(epochs=4, batch_size=32, lr=0.1, warmup=1, milestones=[2, 3], schedule="step", weight_decay=0.0,
          init_seed=0, data_seed=3, progress=False)


@pytest.mark.parametrize("k", [3, 7, 10])  # inside the warm-up, at an epoch boundary, inside epoch 2
def test_start_step_runs_the_rest_of_the_schedule_with_the_same_lr_and_data_order(k):
    d = fake()
    with recording(d) as (rd, full_steps):
        full = permgraph.train(mlp, rd, checkpoints=[k], checkpoint_unit="step", **KW)
    with recording(d) as (rd, part_steps):
        part = permgraph.train(mlp, rd, init_state=full.checkpoint_states[k], start_step=k, **KW)
    assert len(full_steps) == 28 and len(part_steps) == 28 - k and part.steps == 28
    assert part_steps == full_steps[k:]  # learning rate and batches of every step
    assert part_steps[0][0] == lr_at(k, 28, 0.1, "step", 7, [14, 21], 0.1)
    # epochs keep their place in the schedule; a start inside an epoch gives a partial first epoch
    assert [r["epoch"] for r in part.history] == list(range(k // 7 + 1, 5))
    assert [r["step"] for r in part.history] == [r["step"] for r in full.history][k // 7:]
    assert part.final["epoch"] == full.final["epoch"] == 4
    if k % 7 == 0:  # whole epochs: the same metrics as the full run's
        assert part.history[-1]["lr"] == full.history[-1]["lr"]


def test_without_optimizer_state_the_rest_of_a_run_is_bit_identical_to_it():
    # plain SGD keeps no state, so a fresh optimizer from step k's weights continues the run exactly
    d = fake()
    kw = {**KW, "momentum": 0.0}
    full = permgraph.train(mlp, d, checkpoints=[10], checkpoint_unit="step", **kw)
    part = permgraph.train(mlp, d, init_state=full.checkpoint_states[10], start_step=10, **kw)
    sd = full.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in part.model.state_dict().items())
    # with momentum the optimizer starts fresh (as open_lth's retraining does): not the same run
    full_m = permgraph.train(mlp, d, checkpoints=[10], checkpoint_unit="step", **KW)
    part_m = permgraph.train(mlp, d, init_state=full_m.checkpoint_states[10], start_step=10, **KW)
    assert not torch.equal(full_m.model.state_dict()["layers.0.weight"], part_m.model.state_dict()["layers.0.weight"])


class _Stop(Exception):
    pass


def test_a_run_with_start_step_resumes_bit_identically_and_refuses_another_start(tmp_path):
    d = fake()
    start = permgraph.train(mlp, d, checkpoints=[10], checkpoint_unit="step", **KW).checkpoint_states[10]
    kw = dict(init_state=start, start_step=10, **KW)
    full = permgraph.train(mlp, d, **kw)

    def stop(event):
        if event["epoch"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        permgraph.train(mlp, d, checkpoint_dir=str(tmp_path), callbacks=[stop], **kw)
    resumed = permgraph.train(mlp, d, checkpoint_dir=str(tmp_path), **kw)
    sd = full.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in resumed.model.state_dict().items())
    assert [r["epoch"] for r in resumed.history] == [2, 3, 4] and resumed.steps == 28
    assert resumed.history == full.history
    with pytest.raises(FileFormatError, match="began at step 10, this run begins at step 7"):
        permgraph.train(mlp, d, checkpoint_dir=str(tmp_path), **{**kw, "start_step": 7})


def test_start_step_checkpoints_and_bad_values():
    d = fake()
    out = permgraph.train(mlp, d, start_step=14, checkpoints=[2, 3, 4], **KW)  # epoch 2 = the start
    assert sorted(out.checkpoint_states) == [2, 3, 4]
    with pytest.raises(ValueError, match=r"checkpoints \[1\] are outside the run \(2\.\.4 epochs: it starts"):
        permgraph.train(mlp, d, start_step=10, checkpoints=[1, 2], **KW)
    for bad in (-1, 29, 1.5):
        with pytest.raises(ValueError, match="start_step must be"):
            permgraph.train(mlp, d, start_step=bad, **KW)
