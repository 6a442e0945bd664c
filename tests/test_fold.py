"""Weight matching on BatchNorm-folded weights (``align(..., fold_bn=True)``, permgraph/_fold.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from permgraph.experiments.spec import SpecError
from torch import nn

import permgraph
from permgraph import _fold, experiments
from permgraph._verify import randomize_
from permgraph.permutation import permute_state_dict


class Net(nn.Module):
    """conv -> BN, conv (with bias) -> BN, a residual conv -> BN (eps 1e-3) sharing conv1's group,
    linear -> BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8, eps=1e-3)
        self.fc1 = nn.Linear(8, 12)
        self.bn4 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc2(F.relu(self.bn4(self.fc1(x.mean((2, 3))))))


X = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(5))


def _net(seed: int, randomize: bool = True) -> Net:
    torch.manual_seed(seed)
    m = Net()
    if randomize:
        randomize_(m, torch.Generator().manual_seed(seed + 100))
    return m.eval()


@pytest.fixture(scope="module")
def spec():
    return permgraph.trace(_net(0), (X[:2],))


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=tol) for k in a)


def test_plan_pairs_each_batchnorm_with_the_layer_that_feeds_it(spec):
    plan = _fold.plan(spec, _net(0))
    assert plan.source == "model" and not plan.skipped
    assert {(p.norm, p.layer, p.eps) for p in plan.pairs} == {
        ("bn1", "conv1", 1e-5), ("bn2", "conv2", 1e-5), ("bn3", "conv3", 1e-3), ("bn4", "fc1", 1e-5)}
    # from the spec alone: conv1 and conv3 both feed the residual group, so bn1 and bn3 are not guessed
    alone = _fold.plan(spec)
    assert alone.source == "spec" and {(p.norm, p.layer, p.eps) for p in alone.pairs} == {
        ("bn2", "conv2", 1e-5), ("bn4", "fc1", 1e-5)}
    assert set(alone.skipped) == {"bn1", "bn3"} and "2 layers" in alone.skipped["bn1"]


def test_a_batchnorm_fed_by_something_else_is_skipped():
    class PreAct(nn.Module):  # BN after a ReLU, and a BN on the input: nothing to fold
        def __init__(self):
            super().__init__()
            self.bn0 = nn.BatchNorm2d(1)
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(F.relu(self.conv(self.bn0(x)))).mean((2, 3)))

    m = PreAct().eval()
    s = permgraph.trace(m, (X[:2],))
    plan = _fold.plan(s, m)
    assert not plan.pairs and set(plan.skipped) == {"bn0", "bn"}
    assert "not the output of a conv or linear" in plan.skipped["bn"]
    sd = m.state_dict()
    assert all(v is sd[k] for k, v in _fold.fold(s, sd, plan).items())


def test_folding_keeps_the_function_and_commutes_with_permutations(spec):
    m = _net(0)
    plan = _fold.plan(spec, m)
    sd = m.state_dict()
    folded = _fold.fold(spec, sd, plan)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())  # the input is not changed
    assert not torch.allclose(folded["conv1.weight"], sd["conv1.weight"])
    f = copy.deepcopy(m)
    f.load_state_dict(folded)
    with torch.no_grad():
        assert torch.allclose(f(X), m(X), atol=1e-5)
    for seed in range(3):
        perm = permgraph.random_permutation(spec, seed)
        assert _close(_fold.fold(spec, permute_state_dict(sd, spec, perm), plan),
                      permute_state_dict(folded, spec, perm))


def test_folding_commutes_with_permutations_on_a_bn_resnet20():
    m = permgraph.models.create("resnet20", norm="bn", in_channels=1, input_size=8).eval()
    randomize_(m, torch.Generator().manual_seed(1))
    s = permgraph.trace(m, (torch.randn(2, 1, 8, 8),), verify=False)
    plan = _fold.plan(s, m)
    assert len(plan.pairs) == 21 and not plan.skipped  # stem, 18 block convs, 2 shortcut convs
    sd = m.state_dict()
    perm = permgraph.random_permutation(s, 3)
    assert _close(_fold.fold(s, permute_state_dict(sd, s, perm), plan),
                  permute_state_dict(_fold.fold(s, sd, plan), s, perm))


def test_planted_permutation_is_recovered_exactly_with_fold_bn(spec):
    a = _net(0)
    perm = permgraph.random_permutation(spec, 7)
    b = permgraph.apply(a, spec, perm)
    al = permgraph.align(a, b, spec=spec, fold_bn=True, progress=False)
    inv = permgraph.inverse(perm)
    assert all(torch.equal(al.perm[g], inv[g]) for g in inv)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in al.apply(b).state_dict().items())
    info = al.log[0]["fold_bn"]
    assert info["source"] == "model" and info["folded"]["bn3"] == "conv3" and info["eps"]["bn3"] == 1e-3
    assert al.settings["fold_bn"] is True
    # state dicts: pairs from the spec alone, still exact
    al2 = permgraph.align(a.state_dict(), b.state_dict(), spec=spec, fold_bn=True, progress=False)
    assert all(torch.equal(al2.perm[g], inv[g]) for g in inv)
    assert al2.log[0]["fold_bn"]["source"] == "spec"


def _trained(seed: int) -> Net:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    w = torch.randn(36, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(25):
        x = torch.randn(32, 1, 6, 6, generator=gen)
        loss = F.cross_entropy(m(x), (x.flatten(1) @ w).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng():
        return _trained(1), _trained(2)


def test_folded_matching_of_trained_nets_applies_to_the_unfolded_model(spec, trained):
    a, b = trained
    before = copy.deepcopy(b.state_dict())
    al = permgraph.align(a, b, spec=spec, fold_bn=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # b is not changed
    assert len(al.log[0]["fold_bn"]["folded"]) == 4
    assert al.fixed_fraction < 1.0
    pb = al.apply(b).eval()
    with torch.no_grad():
        assert torch.allclose(pb(X), b(X), atol=1e-5)
    plain = permgraph.align(a, b, spec=spec, progress=False)
    assert "fold_bn" not in plain.log[0]
    off = permgraph.align(a, b, spec=spec, fold_bn=False, progress=False)
    assert all(torch.equal(off.perm[g], plain.perm[g]) for g in plain.perm) and "fold_bn" not in off.log[0]


def _rescaled(m: Net, spec, seed: int) -> Net:
    """``m`` with each BatchNorm'd layer's output channels scaled by factors in [e^-1.5, e^1.5] (and the
    running statistics with them): the same function up to eps, which BatchNorm makes a symmetry."""
    m = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(seed)
    sd = m.state_dict()
    with torch.no_grad():
        for p in _fold.plan(spec, m).pairs:
            w = sd[f"{p.layer}.weight"]
            c = torch.exp(torch.empty(w.shape[0]).uniform_(-1.5, 1.5, generator=gen))
            w.mul_(c.view(-1, *[1] * (w.ndim - 1)))
            if f"{p.layer}.bias" in sd:
                sd[f"{p.layer}.bias"].mul_(c)
            sd[f"{p.norm}.running_mean"].mul_(c)
            sd[f"{p.norm}.running_var"].mul_(c * c)
    return m


def test_folded_matching_ignores_the_scale_that_batchnorm_removes(spec, trained):
    a, b = trained
    plain = permgraph.align(a, b, spec=spec, progress=False).perm
    folded = permgraph.align(a, b, spec=spec, fold_bn=True, progress=False).perm
    changed = 0
    for seed in range(3):
        rb = _rescaled(b, spec, seed)
        with torch.no_grad():
            assert torch.allclose(rb(X), b(X), atol=0.05)
        p = permgraph.align(a, rb, spec=spec, fold_bn=True, progress=False).perm
        assert all(torch.equal(p[g], folded[g]) for g in folded)
        q = permgraph.align(a, rb, spec=spec, progress=False).perm
        changed += any(not torch.equal(q[g], plain[g]) for g in plain)
    assert changed  # plain weight matching is not invariant to it


def test_bad_fold_bn_options_are_clear_errors(spec, tmp_path):
    a = _net(0)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="fold_bn must be True or False"):
            permgraph.align(a, a, spec=spec, fold_bn=bad, progress=False)
    with pytest.raises(TypeError, match=r"unknown activation-matching options \['fold_bn'\]"):
        permgraph.align(a, a, "activation", loader=[X], spec=spec, fold_bn=True, progress=False)
    d = {"kind": "pair", "name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}, "seeds": [[0, 1]]}
    assert experiments.parse({**d, "matching": {"methods": ["weight", "weight_folded"]}}).matching.methods == [
        "weight", "weight_folded"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**d, "matching": {"methods": ["weight_fold"]}}))
    with pytest.raises(SpecError, match="matching.methods.0: Input should be 'weight', 'weight_folded' or "
                                        "'activation'"):
        experiments.load(path)
    path.write_text(yaml.safe_dump({**d, "matching": {"fold_bn": True}}))
    with pytest.raises(SpecError, match="matching.fold_bn: unknown field"):
        experiments.load(path)


def test_experiment_context_aligns_with_weight_folded(tmp_path):
    from permgraph.experiments.common import Context
    from permgraph.experiments.store import Store

    d = {"kind": "pair", "name": "t", "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 16,
                                                                           "depth": 2, "norm": "bn"}},
         "data": {"name": "digits"}, "seeds": [[0, 1]], "matching": {"methods": ["weight_folded"]}}
    ctx = Context(experiments.parse(d), Store(tmp_path), progress=False)
    a, b = ctx.build(0).eval(), ctx.build(1).eval()
    for m in (a, b):
        randomize_(m, torch.Generator().manual_seed(3))
    s = permgraph.trace(a, (torch.randn(2, 64),))
    al = ctx.align(a, b, "weight_folded", s)
    assert al.log[0]["fold_bn"]["source"] == "model" and len(al.log[0]["fold_bn"]["folded"]) == 2
    assert "fold_bn" not in ctx.align(a, b, "weight", s).log[0]
