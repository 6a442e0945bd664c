"""Declarative experiment specs: one strict pydantic model per concern, a discriminated ``kind``.

A typo or a wrong type is an error that names the file, the field and the allowed values.
Defaults are documented in each ``Field``; the run hash omits fields left at their defaults, so adding a
field with a no-op default keeps existing runs valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field(description="zoo name: mlp, vgg11/13/16/19, resnet20/32/56, timm:<name>, torchvision:<name>")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="constructor arguments, e.g. {width_multiplier: 4, norm: ln}")


class DataSpec(_Strict):
    name: str = Field(description="data set: digits, mnist1d, mnist5k, cifar10, cifar100, svhn, mnist, "
                                  "fashionmnist, imagefolder, fake")
    root: str | None = Field(default=None, description="folder of disk-based data sets (cifar10, ...)")
    download: bool = Field(default=False, description="allow torchvision to download into root")
    normalize: bool = Field(default=True, description="standardise inputs")
    augment: bool = Field(default=False, description="random flip + 4-pixel crop on the training set")
    seed: int = Field(default=0, description="split / generation seed")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments (fake: input_shape, ...)")
    resize: int | None = Field(default=None, ge=1, description="resize images to this square size (e.g. 32, for "
                               "timm/torchvision models with a minimum input size)")
    channels: int | None = Field(default=None, ge=1, description="repeat a gray channel this many times (3: "
                                 "models built for RGB)")


class TrainSpec(_Strict):
    epochs: int = Field(default=10, ge=1, description="training epochs")
    batch_size: int = Field(default=128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    warmup: int = Field(default=0, ge=0, description="warm-up epochs (linear)")
    milestones: list[int] = Field(default_factory=list, description="epochs at which the lr is multiplied by gamma")
    gamma: float = Field(default=0.1, gt=0)
    checkpoints: list[int] = Field(default_factory=list, description="epochs at which weights are kept (0 = init)")


class MatchSpec(_Strict):
    methods: list[Literal["weight", "weight_folded", "activation"]] = Field(
        default_factory=lambda: ["weight", "activation"],
        description="alignment methods to compare; weight_folded = weight matching on copies with each "
                    "BatchNorm folded into the layer that feeds it (align(..., fold_bn=True))")
    similarity: Literal["pearson", "inner", "cosine"] = Field(default="pearson",
                                                              description="activation-matching similarity")
    residual: Literal["activation", "weight"] = Field(
        default="activation", description="activation matching: groups read only at residual sums (a "
                                          "transformer's residual stream) matched by weights ('weight')")
    num_samples: int = Field(default=4000, ge=1, description="training inputs used by activation matching")
    max_iter: int = Field(default=100, ge=1, description="weight-matching sweeps at most")
    start: Literal["auto", "identity", "anchored", "both"] = Field(
        default="auto", description="where weight matching's coordinate descent starts (align(..., start=)), "
                                    "for the weight and weight_folded methods; 'identity' is plain Git Re-Basin")
    exclude: list[str] = Field(default_factory=list, description="state-dict keys left out of weight matching")


class BarrierSpec(_Strict):
    alphas: int = Field(default=11, ge=2, description="points of the grid linspace(0, 1, n)")
    bn: Literal["auto", "reset", "repair", "none"] = "auto"
    splits: list[Literal["train", "test"]] = Field(default_factory=lambda: ["train", "test"])
    subset: int = Field(default=10000, ge=1, description="first n examples of each split (no augmentation)")
    batch_size: int = Field(default=1000, ge=1)


class IMPSpec(_Strict):
    levels: int = Field(default=4, ge=1)
    fraction: float = Field(default=0.2, gt=0, lt=1, description="fraction of remaining weights pruned per level")
    rewind: int = Field(default=1, ge=0, description="rewind epoch")
    exclude_classifier: bool = False
    arms: list[Literal["own", "dense_perm", "level_perm", "unpermuted", "random", "oneshot"]] = Field(
        default_factory=lambda: ["own", "dense_perm", "level_perm", "unpermuted", "random", "oneshot"])
    arm_levels: list[int] = Field(default_factory=list, description="levels with mask-transfer arms (default all)")
    retrain: Literal["continue", "restart"] = Field(
        default="continue", description="how each level retrains from the rewind point: 'continue' runs the "
        "rest of level 0's schedule (learning rate and data order from the rewind step to the end, as in "
        "open_lth and Frankle et al.); 'restart' trains a full schedule from step 0 (the old behaviour)")


class _Base(_Strict):
    name: str = Field(description="a short name; part of the run folder's name")
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    matching: MatchSpec = Field(default_factory=MatchSpec)
    barrier: BarrierSpec = Field(default_factory=BarrierSpec)

    def run_hash(self) -> str:
        """Content hash of the spec with defaults omitted (canonical JSON)."""
        payload = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def run_name(self) -> str:
        return f"{self.kind}-{self.name}-{self.run_hash()}"


class _Experiment(_Base):
    model: ModelSpec


class PairExperiment(_Experiment):
    """Weak linear connectivity modulo permutation over several seed pairs."""

    kind: Literal["pair"]
    seeds: list[tuple[int, int]] = Field(description="seed pairs (A, B)", min_length=1)


class TrajectoryExperiment(_Experiment):
    """Simultaneous weak LC along training: P_t found at checkpoint t applied at every checkpoint s."""

    from pydantic import field_validator

    kind: Literal["trajectory"]
    seeds: list[tuple[int, int]] = Field(min_length=1)
    match_at: list[int] = Field(min_length=1, description="epochs t at which permutations P_t are found (each a "
                                "checkpoint in train.checkpoints, or the final epoch; the final epoch is always "
                                "added, since P_final is the reference)")
    diagonal: bool = Field(default=True, description="also find P_s at every checkpoint s outside match_at, for "
                           "the curve of P_s applied at s itself and the agreement of P_s with P_final")

    @field_validator("match_at")
    @classmethod
    def _match_at_in_checkpoints(cls, v: list[int], info):
        train = info.data.get("train")
        if train is None:
            return v
        allowed = set(train.checkpoints) | {train.epochs}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"match_at epochs {bad} are not checkpoints: each must be in train.checkpoints "
                             f"{sorted(train.checkpoints)} or be the final epoch {train.epochs}")
        return sorted(set(v))


class IMPExperiment(_Experiment):
    """Simultaneous weak LC along IMP, and IMP mask transfer across seeds."""

    kind: Literal["imp"]
    seeds: list[tuple[int, int]] = Field(min_length=1)
    imp: IMPSpec = Field(default_factory=IMPSpec)


class TripletExperiment(_Experiment):
    """Toward strong LC: pair vs triplet barriers across widths, and permutations composed through chains."""

    kind: Literal["triplet"]
    widths: list[float] = Field(min_length=1, description="values of the width argument")
    width_arg: str = Field(default="width_multiplier", description="model kwarg that sets the width")
    seeds: list[tuple[int, int, int]] = Field(min_length=1, description="seed triples (A, B, C)")
    chain: int = Field(default=3, ge=0, description="extra networks in the longest chain A<-...<-B (0 = none)")


class WMLimitsExperiment(_Experiment):
    """Limits of weight matching: pruned-before-matching variants and early checkpoints."""

    from pydantic import field_validator

    kind: Literal["wm_limits"]
    seeds: list[tuple[int, int]] = Field(min_length=1)
    prune_fractions: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9],
                                         description="fractions x in [0, 1) of each weight tensor's smallest "
                                         "('small') or largest ('large') magnitudes zeroed before weight matching "
                                         "(0 = plain weight matching; always included)")
    early: list[int] = Field(default_factory=list, description="early checkpoints (epochs, each in "
                             "train.checkpoints) at which the matching methods are compared; the final epoch "
                             "is always added as the reference")

    @field_validator("prune_fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]):
        bad = [x for x in v if not 0.0 <= x < 1.0]
        if bad:
            raise ValueError(f"prune_fractions must lie in [0, 1), got {bad}")
        return sorted(set(v) | {0.0})

    @field_validator("early")
    @classmethod
    def _early_in_checkpoints(cls, v: list[int], info):
        train = info.data.get("train")
        if train is None:
            return v
        bad = sorted(set(v) - set(train.checkpoints) - {train.epochs})
        if bad:
            raise ValueError(f"early epochs {bad} are not checkpoints: each must be in train.checkpoints "
                             f"{sorted(train.checkpoints)} (or be the final epoch {train.epochs})")
        return sorted(set(v))


class LandscapeExperiment(_Experiment):
    """Loss over the plane through A, B and P(B)."""

    kind: Literal["landscape"]
    seeds: tuple[int, int] = (0, 1)
    resolution: int = Field(default=11, ge=3, le=101, description="grid points per axis")
    margin: float = Field(default=0.2, ge=0, description="extra extent of the plane beyond the triangle A, B, "
                          "P(B), as a fraction of the triangle's extent along each axis")
    method: Literal["weight", "weight_folded", "activation"] = Field(default="weight",
                                                                     description="how B is aligned to A")
    split: Literal["train", "test"] = Field(default="test", description="data the plane is evaluated on "
                                            "(first barrier.subset examples)")


class ZooModel(_Strict):
    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the architecture's short name: a row "
                       "of the table and a key of results.json")
    name: str = Field(description="zoo name, timm:<name>, torchvision:<name>, or a model class such as "
                      "timm:MlpMixer (every size an argument)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")
    train: dict[str, Any] = Field(default_factory=dict, description="training settings of this model that differ "
                                  "from the spec's train (any field of train)")
    matching: dict[str, Any] = Field(default_factory=dict, description="matching settings of this model that "
                                     "differ from the spec's matching (any field but methods, which are the "
                                     "table's columns), e.g. {residual: weight} for a transformer")


def _overridden(base, over: dict[str, Any], label: str, what: str, fixed: dict[str, str] | None = None):
    """``base`` (a settings model) with the fields of ``over`` over it, for the zoo's model ``label``;
    ``fixed`` names fields a model may not set, with the reason. Errors name the model and the field."""
    cls = type(base)
    fixed = fixed or {}
    unknown = sorted(set(over) - set(cls.model_fields))
    if unknown:
        allowed = ", ".join(f for f in cls.model_fields if f not in fixed)
        raise ValueError(f"models[{label}].{what}: unknown fields {unknown} (allowed: {allowed})")
    for field, why in fixed.items():
        if field in over:
            raise ValueError(f"models[{label}].{what}: {why}")
    try:
        return cls(**{**base.model_dump(), **over})
    except ValidationError as e:
        raise ValueError(f"models[{label}].{what}: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None


class ZooExperiment(_Base):
    """One protocol across architectures: per model, seed pairs trained alike, barriers unaligned and after
    each matching method, the self-permuted control, trace coverage and wall time per phase."""

    from pydantic import model_validator

    kind: Literal["zoo"]
    models: list[ZooModel] = Field(min_length=1, description="the architectures, each with a unique label")
    seeds: list[tuple[int, int]] = Field(min_length=1, description="seed pairs (A, B), the same for every model")

    @model_validator(mode="after")
    def _labels_and_overrides(self):
        labels = [m.label for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"models: labels must be unique; repeated: {dup}")
        for m in self.models:
            self.train_of(m)
            self.matching_of(m)
        return self

    def train_of(self, m: ZooModel) -> TrainSpec:
        """The training settings of model ``m``: the spec's ``train`` with ``m.train`` over it."""
        return _overridden(self.train, m.train, m.label, "train")

    def matching_of(self, m: ZooModel) -> MatchSpec:
        """The matching settings of model ``m``: the spec's ``matching`` with ``m.matching`` over it."""
        return _overridden(self.matching, m.matching, m.label, "matching", fixed={
            "methods": "methods are the table's columns, the same for every model: set them in the spec's matching"})

    def pair_spec(self, m: ZooModel) -> PairExperiment:
        """The pair experiment this spec runs for model ``m`` (its networks are shared with pair runs of the
        same model, data and training)."""
        return PairExperiment(kind="pair", name=f"{self.name}-{m.label}", model=ModelSpec(name=m.name,
                              kwargs=m.kwargs), data=self.data, train=self.train_of(m), matching=self.matching_of(m),
                              barrier=self.barrier, seeds=self.seeds)


Experiment = Annotated[PairExperiment | TrajectoryExperiment | IMPExperiment | TripletExperiment | WMLimitsExperiment | LandscapeExperiment | ZooExperiment, Field(discriminator="kind")]
KINDS = ("pair", "trajectory", "imp", "triplet", "wm_limits", "landscape", "zoo")
_ADAPTER = TypeAdapter(Experiment)


class SpecError(ValueError):
    """A spec file that does not validate; the message names the file, the field and what is allowed."""


def parse(data: dict, source: str = "<spec>"):
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a mapping with a 'kind' field (one of {', '.join(KINDS)})")
    if "kind" not in data:
        raise SpecError(f"{source}: missing field 'kind' (one of {', '.join(KINDS)})")
    if data["kind"] not in KINDS:
        raise SpecError(f"{source}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"][1:]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                model = _model_for(data["kind"], err["loc"][1:-1])
                allowed = ", ".join(model.model_fields) if model else "?"
                msg = f"unknown field (allowed here: {allowed})"
            lines.append(f"  {loc}: {msg} (got {err.get('input')!r})")
        raise SpecError(f"{source}: invalid {data['kind']} spec:\n" + "\n".join(lines)) from None


def _model_for(kind: str, loc: tuple) -> type[BaseModel] | None:
    model: Any = {"pair": PairExperiment, "trajectory": TrajectoryExperiment, "imp": IMPExperiment,
                  "triplet": TripletExperiment, "wm_limits": WMLimitsExperiment,
                  "landscape": LandscapeExperiment, "zoo": ZooExperiment}[kind]
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return model if isinstance(model, type) else None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
    return model


def load(path: str | Path):
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    return parse(data, str(path))

