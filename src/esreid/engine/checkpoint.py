"""The one place that reads and writes checkpoints and knows the run-folder layout.

A run folder (``train.output_dir/run_name``) holds::

    config.yaml          the resolved config the run trains with
    metrics.jsonl        one JSON object per epoch, evaluation or config change
    log.txt              the log lines
    checkpoints/last.pt  the newest checkpoint; checkpoints/prev.pt the one before it
    results.json         the final evaluation of the training run
    results_<dataset>[_rerank].json   later ``esreid evaluate`` runs of its checkpoints
    tensorboard/         TensorBoard event files (train.tensorboard)

The trainer, ``esreid evaluate``/``explain`` and the inference code all go through here;
nothing else spells these names.

One process at a time trains into a run folder: :meth:`RunFolder.lock` takes an advisory
lock on ``.<run name>.lock`` beside the folder (outside it, so that ``--overwrite`` clearing
the folder cannot delete a held lock), and a second ``esreid train`` into the same folder,
whether new, ``--resume`` or ``--overwrite``, is refused with one line naming the holder.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esreid import __version__
from esreid.config import Config, apply_overrides, build_config
from esreid.locking import FileLock, LockBusyError, lock_path_for
from esreid.utils import atomic_torch_save

log = logging.getLogger("esreid.checkpoint")

# Bumped when the checkpoint's contents change incompatibly; older esreid versions refuse
# newer formats instead of failing somewhere inside load_state_dict.
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, not esreid's or does not fit the model."""


class RunBusyError(LockBusyError):
    """Another process is training into the run folder (one line naming it and the holder)."""


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(os.path.expandvars(str(self.path))).expanduser())

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved config."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: the per-epoch log."""
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        """``log.txt``."""
        return self.path / "log.txt"

    @property
    def results(self) -> Path:
        """``results.json``: the training run's final evaluation."""
        return self.path / "results.json"

    @property
    def checkpoints(self) -> Path:
        """The ``checkpoints/`` folder."""
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``: the newest checkpoint."""
        return self.checkpoints / "last.pt"

    @property
    def prev(self) -> Path:
        """``checkpoints/prev.pt``: the checkpoint before ``last.pt``."""
        return self.checkpoints / "prev.pt"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``: the TensorBoard event files of the run."""
        return self.path / "tensorboard"

    def evaluation_results(self, dataset: str, rerank: bool) -> Path:
        """Where ``esreid evaluate`` writes its results (never over ``results.json``)."""
        return self.path / f"results_{dataset}{'_rerank' if rerank else ''}.json"

    def contents(self) -> list[str]:
        """The files that make this folder a run (relative names); empty for a new folder."""
        found = [p.name for p in (self.config, self.metrics, self.results) if p.is_file()]
        if self.checkpoints.is_dir():
            found += [f"checkpoints/{p.name}" for p in sorted(self.checkpoints.glob("*.pt"))]
        return found

    @property
    def lock_file(self) -> Path:
        """``.<name>.lock`` beside the folder: the lock :meth:`lock` takes."""
        return lock_path_for(self.path)

    def lock(self) -> FileLock:
        """Hold the folder for this process until the returned lock is released (or the
        process ends): one trainer per run folder. Raises :class:`RunBusyError` at once when
        another process holds it. Holders within one process share it."""
        try:
            return FileLock(self.lock_file, f"run folder {self.path}").acquire(timeout=0)
        except LockBusyError as err:
            raise RunBusyError(f"{err}: wait for it to finish, or train into another folder "
                               "with --set train.run_name=NEW") from err

    def clear(self) -> None:
        """Delete the whole folder (``--overwrite``), so nothing of the old run survives."""
        if self.path.is_dir():
            shutil.rmtree(self.path)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder | None:
        """The run folder a checkpoint belongs to (``<run>/checkpoints/x.pt``), else None."""
        checkpoint = Path(checkpoint).expanduser().resolve()
        if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.yaml").is_file():
            return cls(checkpoint.parent.parent)
        return None


def evaluation_results_path(checkpoint: Path, dataset: str, rerank: bool) -> Path:
    """Where ``esreid evaluate`` writes a checkpoint's results: ``results_<dataset>[_rerank].json``
    in its run folder, or beside the checkpoint when it is not in one."""
    folder = RunFolder.of_checkpoint(checkpoint)
    if folder is None:
        folder = RunFolder(Path(checkpoint).expanduser().resolve().parent)
    return folder.evaluation_results(dataset, rerank)


def explanations_dir(checkpoint: Path) -> Path:
    """Where ``esreid explain`` writes by default: ``explanations/`` in the checkpoint's run
    folder, or beside the checkpoint when it is not in one."""
    folder = RunFolder.of_checkpoint(checkpoint)
    base = folder.path if folder is not None else Path(checkpoint).expanduser().resolve().parent
    return base / "explanations"


def _not_a_checkpoint(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"not an esreid checkpoint: {path} ({reason})")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file on CPU and check that esreid wrote it.

    Raises :class:`CheckpointError` with one line naming the file and what is wrong: missing,
    a folder, empty, truncated or not a PyTorch file, not esreid's, or a newer format.
    """
    path = Path(os.path.expandvars(str(path))).expanduser()
    if path.is_dir():
        raise _not_a_checkpoint(path, "it is a folder")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise _not_a_checkpoint(path, "empty file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch, zipfile and pickle each fail in their own way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _not_a_checkpoint(path, f"truncated or not a PyTorch file: {first}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise _not_a_checkpoint(path, "no 'model' entry")
    fmt = int(ckpt.get("format", 1))
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by esreid {ckpt.get('esreid_version', '?')} in "
            f"format {fmt}; this esreid ({__version__}) reads formats up to {CHECKPOINT_FORMAT}: "
            "upgrade esreid")
    return ckpt


def load_model_state(model: torch.nn.Module, ckpt: dict[str, Any], path: Path) -> None:
    """Load ``ckpt['model']`` into ``model``, with an error naming the first mismatches."""
    own = model.state_dict()
    state = ckpt["model"]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}")
        if shape:
            k = shape[0]
            details.append(f"{k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}")
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: " + "; ".join(details)
                              + " (was it trained with another --config?)")
    model.load_state_dict(state)


def config_from_checkpoint(ckpt: dict[str, Any], path: Path,
                           overrides: list[str] | None = None) -> Config:
    """The config a checkpoint was trained with, with ``section.key=value`` overrides."""
    raw = ckpt.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} holds no config: pass --config")
    raw = apply_overrides(raw, list(overrides or []))
    return build_config(raw, name=str(raw.pop("name", "custom")))


def model_from_checkpoint(path: str | os.PathLike[str], cfg: Config | None = None,
                          ckpt: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build the model of ``cfg`` (default: the checkpoint's own config) with trained weights.

    ImageNet weights are not loaded: the checkpoint replaces them. ``ckpt`` may pass an
    already read checkpoint to avoid reading the file twice.
    """
    from esreid.models.esnet import build_model

    path = Path(path)
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    cfg = cfg if cfg is not None else config_from_checkpoint(ckpt, path)
    num_classes = int(ckpt.get("num_classes", 0))
    if num_classes < 1:
        raise CheckpointError(f"checkpoint {path} does not record num_classes")
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "pretrained": "none"})
    model = build_model(model_cfg, num_classes, cfg.erase)
    load_model_state(model, ckpt, path)
    return model


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: Path | None = None) -> Path:
    """Write ``state`` (plus esreid's version and format) to ``path`` atomically.

    With ``keep_previous``, the file ``path`` held so far becomes ``keep_previous`` just
    before the new one is renamed into place: at every moment one of the two is complete.
    """
    path = Path(path)
    state = {"esreid_version": __version__, "format": CHECKPOINT_FORMAT, **state}

    atomic_torch_save(state, path, keep_previous)
    return path


def find_resume_checkpoint(folder: RunFolder) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume ``folder`` from, read: ``last.pt``, or ``prev.pt`` with a
    warning naming both when ``last.pt`` is missing, truncated or unreadable."""
    try:
        return folder.last, read_checkpoint(folder.last)
    except CheckpointError as err:
        if not folder.prev.is_file():
            if not folder.last.exists():
                raise CheckpointError(
                    f"run folder {folder.path} has no checkpoint to resume from "
                    f"(neither {folder.last} nor {folder.prev} exists)") from err
            raise
        ckpt = read_checkpoint(folder.prev)
        log.warning("%s; resuming from the previous checkpoint %s instead", err, folder.prev)
        return folder.prev, ckpt
