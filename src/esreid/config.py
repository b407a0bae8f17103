"""Experiment configuration: a few dataclasses filled from a YAML preset plus overrides.

A preset is a YAML file of sections (``data``, ``model``, ``erase``, ``loss``, ``optim``,
``train``, ``eval``). It may name another preset under ``extends:`` and then only lists the
keys it changes. ``--set section.key=value`` overrides are applied last. Every key must exist
in the dataclasses below: an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esreid.data.datasets import DATASET_NAMES, VEHICLEID_TEST_SIZES
from esreid.models.erasers import ERASERS, canonical_erase_value, eraser_names

PRESET_DIR = Path(__file__).parent / "configs"

#: Values of ``train.amp``.
AMP_MODES = ("none", "fp16", "bf16")
#: Values of ``model.aib_pool`` / ``model.esb_pool`` (the names ``build_pooling`` resolves).
POOLINGS = ("gap", "gmp", "ppool", "gem")
#: Values of ``loss.triplet_kind``.
TRIPLET_KINDS = ("hard", "weighted")
#: Values of ``model.backbone`` (the names ``models.backbone.build_resnet`` builds; checked
#: here so that a typo stops a run before its data is read or generated).
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
#: Values of ``model.pretrained`` besides the path of a weight file.
PRETRAINED_SOURCES = ("imagenet", "none")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    """Which dataset, how images are sized and how batches are sampled."""

    name: str = "market1501"  # market1501 | dukemtmc | msmt17 | veri776 | vehicleid | custom | synthetic
    # Folder holding the benchmark (or the benchmark folder itself); ~ and $VARS expand.
    root: str = "data"
    height: int = 384
    width: int = 128
    ids_per_batch: int = 16  # J identities per batch
    num_instances: int = 4  # K images per identity
    num_workers: int = 2
    flip_prob: float = 0.5
    pad: int = 0  # >0: pad then random-crop back to size
    # Random Erasing augmentation of every training image (Zhong et al.; AGW uses 0.5): the
    # probability that a rectangle of 2-40% of the image is set to the mean pixel.
    random_erasing: float = 0.0
    test_size: int = 800  # VehicleID test list: 800 | 1600 | 2400
    cam_pattern: str = ""  # custom folders: regex with one group giving the camera from a file name
    synth_ids: int = 300  # synthetic benchmark: number of identities (generated when missing)
    synth_seed: int = 0
    # What a training run does with an image file it cannot read or decode: "error" stops the
    # run naming the file; "skip" leaves the image out and logs it (error | skip).
    on_bad_image: str = "error"
    # Warn when a benchmark's split sizes differ from its published statistics (a partial
    # or modified copy); false silences it.
    check_stats: bool = True


@dataclass
class ModelConfig:
    """Backbone and branches. ``aib``/``esb`` switch the two branches of ES-Net on and off."""

    backbone: str = "resnet50"  # resnet10 (tests) | resnet18 | resnet34 | resnet50 | resnet101
    pretrained: str = "imagenet"  # imagenet | none | path to a state-dict file (~ and $VARS expand)
    last_stride: int = 1
    split: str = "layer3"  # first stage each branch owns (layer3: share stem+layer1+layer2)
    aib: bool = True  # All Information Branch: clean images
    esb: bool = True  # Erasing Salient Branch: erased images
    aib_pool: str = "gap"  # gap | gmp | ppool | gem
    esb_pool: str = "ppool"
    ppool_init: float = 3.0
    ppool_per_channel: bool = False
    # Non-local blocks per stage (layer1..layer4), after the stage's last blocks; AGW's are
    # [0, 2, 3, 0]. With ES-Net's split the trunk's blocks are shared, each branch owns its own.
    non_local: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    # AGW's published code (what Table VII's numbers come from) differs from the AGW paper: a
    # non-local block's inner width is 1 channel and the stem has no ReLU after its BatchNorm.
    # true reproduces the code; false gives the paper's form (width C / 2, the usual stem).
    agw_published_quirks: bool = False


@dataclass
class EraseConfig:
    """How the ESB's input is erased during training (BESM or a comparison eraser)."""

    method: str = "besm"  # none | besm | gradcam | random | bfd: esreid.models.erasers.ERASERS
    ratio: float = 0.2  # R: fraction of pixel positions erased (besm, gradcam)
    prob: float = 0.5  # P: probability that an image is erased
    # What erased pixels become: mean (0 in normalised space, the paper's choice), zero
    # (black), random (per-pixel noise, as Random Erasing) or a number in normalised space.
    value: str = "mean"
    layer: str = "layer4"  # ESB stage whose output is the CG-RAM layer L (res_conv5 = layer4)
    # true: only the erased images take the second trunk pass, the others reuse the clean
    # trunk features (same images; the trunk's BatchNorm sees the erased subset's statistics).
    # false: the whole batch I* goes through the trunk again, as Algorithm 1 is written.
    reuse_clean: bool = True
    bfd_height: float = 0.3  # batch feature dropping block, as fractions of the feature map
    bfd_width: float = 1.0


@dataclass
class LossConfig:
    """Eq. 1: per branch, label-smoothed cross-entropy plus batch-hard triplet loss."""

    label_smooth: float = 0.1
    triplet: bool = True
    margin: float = 0.3
    # hard: batch-hard triplet (Hermans et al.); weighted: AGW's weighted regularization
    # triplet (softmax-weighted distances, soft margin; no margin).
    triplet_kind: str = "hard"


@dataclass
class OptimConfig:
    """Adam with linear warm-up then step decay (the paper's person schedule by default)."""

    epochs: int = 120
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    iters_per_epoch: int = 0  # 0: one pass over the training set; >0 caps an epoch (demo)


@dataclass
class TrainConfig:
    """Run bookkeeping: seed, device, checkpoints, logging."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Mixed precision: none | fp16 (CUDA, with a GradScaler) | bf16 (CPU and CUDA). The old
    # boolean still loads: true means fp16 (on CUDA; float32 elsewhere), false none.
    amp: str = "none"
    channels_last: bool = False  # channels-last memory format for the model and the batches
    compile: bool = False  # torch.compile the training forward (and loss)
    # The torch.compile backend: inductor (generated kernels), or e.g. aot_eager (traces
    # forward and backward without generating code: quick to start, for checks).
    compile_backend: str = "inductor"
    # Distributed runs on CUDA: SyncBatchNorm across processes (off, as the paper trains on
    # one GPU; per-process BatchNorm statistics otherwise).
    sync_bn: bool = False
    # TensorBoard event files under the run folder's tensorboard/ (when the tensorboard
    # package is installed; a log line says so when it is not).
    tensorboard: bool = True
    output_dir: str = "runs"  # ~ and $VARS expand
    run_name: str = ""  # default: the preset name
    # Epochs between checkpoints (last.pt; the one before becomes prev.pt); the last epoch is
    # always saved, and SIGTERM / Ctrl-C save the current step. 0: only those.
    checkpoint_every: int = 1
    # Also save a mid-epoch checkpoint every N training iterations, so that a long epoch
    # interrupted near its end does not lose the whole epoch; 0: off.
    checkpoint_every_iters: int = 0
    eval_every: int = 0  # epochs; 0: evaluate once at the end
    diagnose_erasing: bool = True  # log the over-erasing diagnostic (Fig. 3) every epoch
    progress: bool = True  # show a progress bar


@dataclass
class EvalConfig:
    """Retrieval evaluation."""

    metric: str = "cosine"  # cosine | euclidean
    flip: bool = True  # average descriptors of the image and its mirror
    batch_size: int = 128
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017)
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    num_draws: int = 10  # VehicleID protocol draws
    # Cross-domain testing: evaluate on another benchmark than the training one (its query
    # and gallery). Empty: the training dataset (data.name) and root (data.root).
    dataset: str = ""
    root: str = ""  # ~ and $VARS expand


@dataclass
class Config:
    """A whole experiment."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``resolved_config.yaml`` holds)."""
        return dataclasses.asdict(self)


def list_presets() -> list[str]:
    """Names of the presets shipped with esreid."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"unknown preset {str(name_or_path)!r}: expected a .yaml path or one of {', '.join(list_presets())}"
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving ``extends`` recursively (a file's own keys win)."""
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, seen + (path,)))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = _preset_path(parent) if not str(parent).endswith((".yaml", ".yml")) else (
        (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    )
    return _merge(_read_yaml(parent_path, seen + (path,)), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {value!r}: {err}") from err
    return key.split("."), parsed


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``, converting int->float and None->'none'."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {key}: unsupported type {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if value is None:
            return "none"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key}: unsupported type {tp}")


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(raw: dict[str, Any], name: str = "custom") -> Config:
    """Turn a nested dict into a validated :class:`Config`; unknown keys raise ConfigError."""
    cfg = Config(name=str(raw.get("name", name)))
    sections = _section_types(Config)
    for section, values in raw.items():
        if section == "name":
            continue
        if section not in sections or section == "name":
            valid = ", ".join(s for s in sections if s != "name")
            raise ConfigError(f"unknown config section {section!r} (valid: {valid})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        target = getattr(cfg, section)
        fields = _section_types(type(target))
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {section}.{key} (valid keys of {section}: {', '.join(fields)})"
                )
            if (section, key) == ("train", "amp") and isinstance(value, bool):
                value = _deprecated_amp(value)
            value = _coerce(value, fields[key], f"{section}.{key}")
            if (section, key) == ("erase", "value"):
                try:
                    value = canonical_erase_value(value)
                except ValueError as err:
                    raise ConfigError(f"config key erase.value: {err}") from None
            setattr(target, key, value)
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def _deprecated_amp(value: bool) -> str:
    """The pre-0.2 boolean ``train.amp``: true meant fp16 autocast on CUDA."""
    warnings.warn("config key train.amp: true/false is deprecated; use none | fp16 | bf16 "
                  f"(read {str(value).lower()} as {'fp16' if value else 'none'})",
                  DeprecationWarning, stacklevel=4)
    return "fp16" if value else "none"


# Keys holding a file or folder path. model.pretrained is a path unless it names a source.
_PATH_KEYS = ("data.root", "train.output_dir", "model.pretrained", "eval.root")
_PRETRAINED_SOURCES = ("imagenet", "none", "")
_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def _expand_path(key: str, value: str) -> str:
    """``value`` with environment variables and ``~`` expanded; ConfigError naming ``key`` if a
    variable is not set (left alone it would become a literal ``$NAME`` folder)."""
    expanded = os.path.expandvars(value)
    unset = _UNSET_VAR.search(expanded)
    if unset:
        name = unset.group(1).strip("{}")
        raise ConfigError(
            f"config key {key}: environment variable {name} in {value!r} is not set"
        )
    return os.path.expanduser(expanded)


def _expand_paths(cfg: Config) -> None:
    """Expand ``~`` and ``$VARS`` in every path-valued key, so the resolved config (and the
    ``config.yaml`` saved from it) holds the path that is actually used."""
    for key in _PATH_KEYS:
        section, name = key.split(".")
        target = getattr(cfg, section)
        value = getattr(target, name)
        if key == "model.pretrained" and value in _PRETRAINED_SOURCES:
            continue
        setattr(target, name, _expand_path(key, value))


def validate(cfg: Config) -> None:
    """Check value ranges and choices that types alone cannot; raise ConfigError naming the key.

    Runs at load time so that a bad value stops the run before any data is read or any
    model is built, with a message naming the key rather than the function that trips on it.
    """
    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(options)}")

    def at_least(key: str, value: float, low: float) -> None:
        # Written as "not >=" so that NaN (YAML .nan) is rejected too.
        if not (math.isfinite(value) and value >= low):
            raise ConfigError(f"config key {key}: must be >= {low}, got {value}")

    def positive(key: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"config key {key}: must be > 0, got {value}")

    def within(key: str, value: float, low: float, high: float, open_low: bool = False,
               open_high: bool = False) -> None:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
        if not ok:  # also false for NaN
            interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            raise ConfigError(f"config key {key}: {value} is outside {interval}")

    choice("model.backbone", cfg.model.backbone, BACKBONES)
    choice("model.aib_pool", cfg.model.aib_pool, POOLINGS)
    choice("model.esb_pool", cfg.model.esb_pool, POOLINGS)
    choice("loss.triplet_kind", cfg.loss.triplet_kind, TRIPLET_KINDS)
    if len(cfg.model.non_local) != 4:
        raise ConfigError("config key model.non_local: one count per stage (layer1..layer4), "
                          f"got {cfg.model.non_local}")
    for i, count in enumerate(cfg.model.non_local):
        at_least(f"model.non_local[{i}]", count, 0)
    if cfg.eval.dataset:
        choice("eval.dataset", cfg.eval.dataset, DATASET_NAMES)
    choice("model.split", cfg.model.split, ("layer1", "layer2", "layer3", "layer4"))
    choice("erase.method", cfg.erase.method, eraser_names())
    choice("erase.layer", cfg.erase.layer, ("layer3", "layer4"))
    choice("eval.metric", cfg.eval.metric, ("cosine", "euclidean"))
    choice("data.on_bad_image", cfg.data.on_bad_image, ("error", "skip"))
    choice("train.amp", cfg.train.amp, AMP_MODES)
    if not (cfg.model.aib or cfg.model.esb):
        raise ConfigError("model.aib and model.esb are both false: at least one branch is needed")
    within("erase.ratio", cfg.erase.ratio, 0.0, 1.0)
    within("erase.prob", cfg.erase.prob, 0.0, 1.0)
    eraser = ERASERS[cfg.erase.method]
    if eraser.needs_esb and not cfg.model.esb:
        raise ConfigError(
            f"erase.method={cfg.erase.method} erases the ESB's input but model.esb is false"
        )
    order = ("layer1", "layer2", "layer3", "layer4")
    if cfg.model.esb and order.index(cfg.erase.layer) < order.index(cfg.model.split):
        raise ConfigError(
            f"config key erase.layer: {cfg.erase.layer} lies before model.split={cfg.model.split}, "
            "so it is not inside the ESB"
        )

    data = cfg.data
    at_least("data.height", data.height, 1)
    at_least("data.width", data.width, 1)
    at_least("data.ids_per_batch", data.ids_per_batch, 2)
    at_least("data.num_instances", data.num_instances, 1)
    needs_pairs = [
        reason
        for reason, on in (
            ("the batch-hard triplet loss (loss.triplet is true)", cfg.loss.triplet),
            (f"{eraser.pairs_reason} (erase.method is {cfg.erase.method})",
             eraser.pairs_reason is not None and cfg.model.esb),
        )
        if on
    ]
    if needs_pairs and data.num_instances < 2:
        raise ConfigError(
            f"config key data.num_instances: must be >= 2, got {data.num_instances}: "
            f"{' and '.join(needs_pairs)} need{'s' if len(needs_pairs) == 1 else ''} a second "
            "image of the same identity in every batch"
        )
    within("data.flip_prob", data.flip_prob, 0.0, 1.0)
    within("data.random_erasing", data.random_erasing, 0.0, 1.0)
    at_least("data.pad", data.pad, 0)
    at_least("data.num_workers", data.num_workers, 0)
    if data.test_size not in VEHICLEID_TEST_SIZES:
        raise ConfigError(
            f"config key data.test_size: {data.test_size} is not one of "
            f"{', '.join(map(str, VEHICLEID_TEST_SIZES))} (the VehicleID test lists)"
        )

    within("loss.label_smooth", cfg.loss.label_smooth, 0.0, 1.0, open_high=True)
    at_least("loss.margin", cfg.loss.margin, 0)

    optim = cfg.optim
    at_least("optim.epochs", optim.epochs, 1)
    positive("optim.lr", optim.lr)
    at_least("optim.weight_decay", optim.weight_decay, 0)
    at_least("optim.warmup_epochs", optim.warmup_epochs, 0)
    within("optim.gamma", optim.gamma, 0.0, 1.0, open_low=True)
    for i, milestone in enumerate(optim.milestones):
        at_least(f"optim.milestones[{i}]", milestone, 0)
    if sorted(optim.milestones) != optim.milestones:
        raise ConfigError(f"config key optim.milestones: must be increasing, got {optim.milestones}")
    at_least("optim.iters_per_epoch", optim.iters_per_epoch, 0)

    at_least("train.checkpoint_every", cfg.train.checkpoint_every, 0)
    at_least("train.checkpoint_every_iters", cfg.train.checkpoint_every_iters, 0)
    at_least("train.eval_every", cfg.train.eval_every, 0)

    at_least("eval.batch_size", cfg.eval.batch_size, 1)
    at_least("eval.k1", cfg.eval.k1, 1)
    at_least("eval.k2", cfg.eval.k2, 1)
    within("eval.lambda_value", cfg.eval.lambda_value, 0.0, 1.0)
    at_least("eval.num_draws", cfg.eval.num_draws, 1)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (a new dict is returned)."""
    out = _merge(raw, {})
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2:
            raise ConfigError(f"override {text!r}: keys look like section.key (e.g. optim.lr=1e-4)")
        section, key = path
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {section} is not a section")
        if (section, key) == ("model", "pretrained"):
            _check_pretrained_override(value)
        node[key] = value
    return out


def _check_pretrained_override(value: Any) -> None:
    """A ``--set model.pretrained=`` value that is neither a source name nor shaped like a
    path (no folder, no extension: "imagnet") is a typo, refused before any data is read.
    Whether a path exists is checked when the model is built (a saved config's paths may
    point elsewhere by then)."""
    if value is None or str(value) in PRETRAINED_SOURCES:
        return
    text = str(value)
    if "/" not in text and os.sep not in text and not os.path.splitext(text)[1] \
            and not Path(text).is_file():
        raise ConfigError(f"config key model.pretrained: {text!r} is neither "
                          f"{' nor '.join(PRETRAINED_SOURCES)} nor the path of a weight file")


def load_config(preset: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset name (see :func:`list_presets`) or YAML path, apply overrides, validate."""
    path = _preset_path(preset)
    raw = _read_yaml(path)
    raw = apply_overrides(raw, list(overrides or []))
    default_name = path.stem
    return build_config(raw, name=raw.pop("name", default_name))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from esreid.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Keys a resumed run may change freely: where things are and how the run is kept or watched,
# not what is trained. Any other difference (model, data, erase, loss, optimiser schedule,
# seed) changes the experiment, and resuming with it needs --force.
RESUME_FREE_KEYS = frozenset({
    "name", "data.root", "data.num_workers", "data.on_bad_image", "data.check_stats",
    "optim.epochs",
    "train.device", "train.output_dir", "train.run_name", "train.checkpoint_every",
    "train.checkpoint_every_iters", "train.eval_every", "train.diagnose_erasing",
    "train.progress", "train.tensorboard", "train.compile", "train.compile_backend",
    "train.channels_last",
})


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff_configs(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs: ``{"section.key": (old, new)}``."""
    a, b = flatten_config(old.to_dict()), flatten_config(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def experiment_changes(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    """The keys of a :func:`diff_configs` result that change the experiment itself (all but
    :data:`RESUME_FREE_KEYS` and the ``eval`` section, which only changes how it is scored)."""
    return [k for k in changes if k not in RESUME_FREE_KEYS and not k.startswith("eval.")]
