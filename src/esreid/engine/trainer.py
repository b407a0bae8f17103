"""The training loop: data, model, Eq. 1 loss, Adam with warm-up + step decay, checkpoints.

The run folder's layout and the checkpoint files belong to :mod:`esreid.engine.checkpoint`.
A run never silently reuses a folder that holds another run: it refuses, resumes it, or
(``overwrite=True``) clears it first, and it validates the config and the data before
writing anything. SIGTERM and SIGINT finish the current step, save a checkpoint and raise
:class:`TrainingInterrupted`; checkpoints hold the position inside the epoch, so a resumed
run continues bit for bit where the interrupted one stopped.

Under ``torchrun`` the same loop trains one model with DistributedDataParallel: each process
takes J / world_size identities of every global batch (see PKSampler), gradients are
averaged, the logged losses are the means over the processes, and only rank 0 writes the
run folder. Steps, checkpoints, stops and evaluations are collective: every rank reaches
them at the same iteration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from esreid.config import Config, ConfigError, diff_configs, experiment_changes, save_config
from esreid.data.loader import BadImageLog, build_train_loader
from esreid.data.records import ReIDData
from esreid.engine import distributed
from esreid.engine.checkpoint import (
    CheckpointError,
    RunFolder,
    config_from_checkpoint,
    find_resume_checkpoint,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from esreid.engine.data import check_data, load_data, load_eval_data
from esreid.engine.evaluate import evaluate_model, format_metrics
from esreid.engine.objective import TrainingObjective, branch_loss
from esreid.engine.optim import build_optimizer
from esreid.engine.schedule import lr_factor
from esreid.engine.tensorboard import cgram_overlay_batch, open_tensorboard, overlay_batch
from esreid.metrics import write_results
from esreid.models.esnet import ESNet, build_model
from esreid.saliency import besm_erase
from esreid.utils import (
    clean_stale_temp,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_run_logging,
)

__all__ = ["CheckpointError", "EpochStats", "RunExistsError", "Trainer", "TrainingDiverged",
           "TrainingInterrupted", "load_data"]

log = logging.getLogger("esreid.train")

#: Rank r's erasing generator starts from ``train.seed + 1 + RANK_SEED_STRIDE * r``, so the
#: processes of a distributed run erase independently (rank 0 as a single-process run).
RANK_SEED_STRIDE = 1_000_003

_AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resuming nor overwriting was asked."""


class TrainingDiverged(FloatingPointError):
    """A loss term, the saliency maps or the gradients of a step became non-finite.

    The step was not applied, so the last checkpoint holds the last good state; the message
    says where it is and how to resume. ``term`` names what became non-finite.
    """

    exit_code = 3

    def __init__(self, term: str, message: str) -> None:
        super().__init__(message)
        self.term = term


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after a checkpoint was saved.

    ``exit_code`` is 128 + the signal number, as a shell reports a signalled program.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class EpochStats:
    """What one epoch measured."""

    epoch: int
    loss: float
    parts: dict[str, float]
    lr: float
    images_per_s: float
    seconds: float
    step_losses: list[float]


@dataclass
class _EpochProgress:
    """What the current epoch has accumulated so far; checkpointed with a mid-epoch state so
    the resumed epoch's record equals the uninterrupted one's."""

    losses: list[float] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    seconds: float = 0.0
    amp_skipped: int = 0  # fp16 steps GradScaler skipped (overflowing gradients)



class Trainer:
    """Holds the state of a run and trains it epoch by epoch.

    ``Trainer(cfg)`` checks the config's data, then prepares a new run folder; it refuses a
    folder that already holds a run (:class:`RunExistsError`) unless ``overwrite`` (the
    folder is cleared first) or ``resume`` is given: a checkpoint path of that run, or
    ``"auto"`` for its ``last.pt`` (``prev.pt`` when ``last.pt`` is damaged). On
    resume, keys of ``cfg`` that differ from the run's ``config.yaml`` and change the
    experiment need ``force``; every difference is recorded in ``metrics.jsonl``.
    :meth:`fit` trains to ``cfg.optim.epochs`` and evaluates at the end. Launched by
    torchrun, every process builds a Trainer with the same arguments (see the module
    docstring); ``self.ctx`` says which rank this one is.
    """

    def __init__(self, cfg: Config, data: ReIDData | None = None, run_dir: Path | None = None,
                 *, resume: Path | str | None = None, overwrite: bool = False,
                 force: bool = False) -> None:
        self.cfg = cfg
        self.folder = RunFolder(Path(run_dir) if run_dir else
                                Path(cfg.train.output_dir) / (cfg.train.run_name or cfg.name))
        self.run_dir = self.folder.path
        self.metrics_path = self.folder.metrics
        self.ctx = distributed.setup(cfg.train.device)
        self.device = self.ctx.device
        self.is_main = self.ctx.is_main
        self.world_size = self.ctx.world_size
        if not self.is_main:
            logging.getLogger("esreid").setLevel(logging.WARNING)  # rank 0 tells the story
        seed_everything(cfg.train.seed)

        # Everything that can be refused is checked before the first write.
        self.data = data if data is not None else self._load_data(cfg, load_data)
        check_data(self.data, cfg)
        # Cross-domain testing evaluates on another benchmark's query and gallery.
        self.eval_data = self._load_data(cfg, lambda c: load_eval_data(c, self.data))
        if self.eval_data is not self.data:
            check_data(self.eval_data, cfg, training=False)
        d = cfg.data
        if d.ids_per_batch % self.world_size:
            raise ConfigError(
                f"config key data.ids_per_batch: the {d.ids_per_batch} identities of a (global) "
                f"batch must split evenly between the {self.world_size} processes")
        # One process trains into a run folder at a time (rank 0 holds it for a torchrun job).
        self._folder_lock = self.folder.lock() if self.is_main else None
        resume_state = None
        if resume is not None and self.is_main:
            # A resumed folder is already a run: its log may record how the checkpoint was
            # chosen (e.g. the fall-back to prev.pt).
            setup_run_logging(self.run_dir)
        if resume == "auto":
            resume, resume_state = find_resume_checkpoint(self.folder)
        elif resume is not None:
            resume_state = read_checkpoint(resume)
        changes: dict[str, tuple[Any, Any]] = {}
        if resume is None:
            existing = self.folder.contents()
            if existing and not overwrite:
                raise RunExistsError(
                    f"run folder {self.run_dir} already holds a run ({', '.join(existing)}); "
                    "continue it with --resume auto, start another with --set "
                    "train.run_name=NEW, or replace it with --overwrite")
        else:
            changes = self._config_changes(resume_state, Path(resume), force)

        self.num_classes = self.data.num_train_pids
        self.batch_size = d.ids_per_batch * d.num_instances  # global: all processes together
        self.loader = build_train_loader(
            self.data.train, d.height, d.width, batch_size=self.batch_size,
            num_instances=d.num_instances, num_workers=d.num_workers, seed=cfg.train.seed,
            flip_prob=d.flip_prob, pad=d.pad, on_bad_image=d.on_bad_image,
            num_replicas=self.world_size, rank=self.ctx.rank, random_erasing=d.random_erasing,
        )
        self.iters_per_epoch = self._epoch_length(0)
        if self.iters_per_epoch < 1:
            raise ConfigError("the training split is too small for one batch "
                              f"of {d.ids_per_batch} ids x {d.num_instances} images")

        self.model: ESNet = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.objective = self._wrap_objective(TrainingObjective(self.model, cfg.loss))
        self.generator = torch.Generator(device="cpu").manual_seed(
            cfg.train.seed + 1 + RANK_SEED_STRIDE * self.ctx.rank)
        self.amp_dtype = _AMP_DTYPES[cfg.train.amp]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            log.warning("train.amp=fp16 needs CUDA; training in float32 on %s (bf16 works on "
                        "CPU)", self.device)
            self.amp_dtype = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.epoch = 0  # completed epochs
        self.iteration = 0  # steps done in the current epoch
        self.progress = _EpochProgress()
        self.bad_images = BadImageLog()
        self._saved_at: tuple[int, int] | None = None
        self._stop_signal: int | None = None
        self._in_steps = False

        if resume_state is not None:
            # Restored before the first write: a checkpoint that does not fit the (forced)
            # config fails here and leaves the run folder as it was.
            self._restore(resume_state, Path(resume))

        # Every process has checked the folder before rank 0 writes to it.
        distributed.barrier(self.ctx)
        self._tb: Any = None  # opened with the first scalar to log (see _tensorboard)
        self._tb_purge = self.epoch + 1 if resume_state is not None else None
        self._tb_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.is_main:
            return
        # From here on the run folder is written.
        if overwrite and resume is None:
            self.folder.clear()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_run_logging(self.run_dir)
        for folder in (self.run_dir, self.folder.checkpoints):
            for stale in clean_stale_temp(folder):
                log.info("removed %s, left by an interrupted write", stale)
        if resume_state is None or changes or not self.folder.config.is_file():
            save_config(cfg, self.folder.config)
        if resume_state is not None:
            if Path(resume) == self.folder.prev and self.folder.last.exists():
                # Keep the damaged file for inspection, but out of the prev.pt rotation.
                os.replace(self.folder.last, self.folder.checkpoints / "last.pt.damaged")
            self._trim_metrics_log()
            if changes:
                self._log_metrics({"type": "config_change", "epoch": self.epoch,
                                   "iteration": self.iteration, "forced": force,
                                   "changes": {k: list(v) for k, v in changes.items()}})
                log.info("config changed on resume: %s", ", ".join(
                    f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))

    # --- construction -----------------------------------------------------------------

    def _load_data(self, cfg: Config, load) -> ReIDData:
        """``load(cfg)``; in a distributed run rank 0 loads (and, for the synthetic
        benchmark, generates) it first, so the processes never write the same files."""
        if self.is_main:
            data = load(cfg)
        distributed.barrier(self.ctx)
        if not self.is_main:
            data = load(cfg)
        return data

    def _build_model(self) -> ESNet:
        """The config's model on the device, in the configured memory format and BatchNorm."""
        cfg = self.cfg
        model = build_model(cfg.model, self.num_classes, cfg.erase).to(self.device)
        if cfg.train.sync_bn and self.ctx.distributed:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("train.sync_bn needs CUDA; each process keeps its own BatchNorm "
                            "statistics")
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _wrap_objective(self, objective: TrainingObjective) -> torch.nn.Module:
        """The training forward as run: in DistributedDataParallel when several processes
        train, compiled when ``train.compile`` is on."""
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            objective = DistributedDataParallel(
                objective, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            objective = torch.compile(objective, backend=self.cfg.train.compile_backend)
        return objective

    # --- bookkeeping ------------------------------------------------------------------

    def _config_changes(self, ckpt: dict[str, Any], path: Path, force: bool) -> dict[str, tuple[Any, Any]]:
        """Differences between ``self.cfg`` and the config the checkpoint's run trained with;
        raises ConfigError when one alters the experiment and ``force`` is false."""
        from esreid.config import load_config

        saved = (load_config(self.folder.config) if self.folder.config.is_file()
                 else config_from_checkpoint(ckpt, path))
        changes = diff_configs(saved, self.cfg)
        for key in ("train.output_dir", "train.run_name"):
            changes.pop(key, None)  # where the folder is now (a moved run), not what it does
        risky = experiment_changes(changes)
        if risky and not force:
            raise ConfigError(
                f"resuming {self.run_dir} with a changed experiment ("
                + ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in risky)
                + "): pass --force to continue anyway (the change is recorded in metrics.jsonl), "
                  "or start a new run with --set train.run_name=NEW")
        return changes

    def _trim_metrics_log(self) -> None:
        """Drop records after the restored epoch, so a resumed run logs each epoch once."""
        if not self.metrics_path.is_file():
            return
        from esreid.utils import atomic_write_text

        kept = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a hard kill
                if record.get("epoch", 0) <= self.epoch:
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _tensorboard(self) -> Any:
        """The run's TensorBoard log (rank 0, ``train.tensorboard``, package installed),
        opened on first use, so a run that logs nothing (a finished run resumed) leaves no
        event file; None when there is none."""
        if self._tb is None:
            self._tb = False
            if self.is_main:
                # A resumed run hides the events after its checkpoint, as metrics.jsonl drops them.
                self._tb = open_tensorboard(self.run_dir, self.cfg.train.tensorboard,
                                            purge_step=self._tb_purge) or False
            if self._tb:
                self._tb_batch = overlay_batch(self.data.train, self.cfg.data.height,
                                               self.cfg.data.width)
        return self._tb or None

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {**record, "world_size": self.world_size}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record.get("type") in ("train", "eval") and self._tensorboard() is not None:
            self._tb.log_record(record)

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Write the whole training state atomically; returns the path.

        By default to ``last.pt``, whose previous version becomes ``prev.pt``. The state
        includes the position inside the current epoch and the epoch's running statistics.
        In a distributed run every process must call it (each one's RNG and erasing
        generator states are gathered); rank 0 writes.
        """
        own = {"rng": rng_state(), "generator": self.generator.get_state()}
        ranks = distributed.gather_to_main(self.ctx, own)
        target = self.folder.last if path is None else Path(path)
        if not self.is_main:
            if path is None:
                self._saved_at = (self.epoch, self.iteration)
            return target
        state = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "iters_per_epoch": self.iters_per_epoch,
            "progress": vars(self.progress),
            "bad_images": self.bad_images.paths,
            "num_classes": self.num_classes,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": own["rng"],
            "generator": own["generator"],
            "world_size": self.world_size,
        }
        if self.ctx.distributed:
            state["ranks"] = ranks
        if path is None:
            path = save_checkpoint(state, self.folder.last, keep_previous=self.folder.prev)
            self._saved_at = (self.epoch, self.iteration)
        else:
            save_checkpoint(state, Path(path))
        return Path(path)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` to continue training."""
        self._restore(read_checkpoint(path), Path(path))

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        load_model_state(self.model, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        own = self._own_random_state(ckpt)
        if own is not None:
            set_rng_state(own["rng"])
            self.generator.set_state(own["generator"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt.get("iteration", 0))
        self.progress = _EpochProgress(**ckpt.get("progress", {}))
        self.bad_images.update(ckpt.get("bad_images", []))
        self._saved_at = (self.epoch, self.iteration)
        where = f" iteration {self.iteration}" if self.iteration else ""
        log.info("resumed from %s at epoch %d%s", path, self.epoch, where)

    def _own_random_state(self, ckpt: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG and generator states in ``ckpt``: its own entry when the checkpoint
        comes from a run of the same world size, rank 0's otherwise on rank 0 (and none on
        the other ranks, which keep their fresh seeds)."""
        ranks = ckpt.get("ranks")
        saved_world = int(ckpt.get("world_size", 1))
        if ranks is not None and saved_world == self.world_size:
            return ranks[self.ctx.rank]
        if saved_world != self.world_size:
            log.warning("the checkpoint was written by %d process(es), this run has %d: the "
                        "batches continue where they were, but the erasing draws of ranks "
                        "other than 0 start afresh", saved_world, self.world_size)
        return {"rng": ckpt["rng"], "generator": ckpt["generator"]} if self.is_main else None

    # --- interruption -----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            # A second Ctrl-C: the user does not want to wait for the step.
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self._stop_signal = signum
        if not self._in_steps and not self.ctx.distributed:
            # Between steps (evaluation, checkpointing): stop right away. A distributed run
            # stops where all ranks agree (after the next step or epoch), since saving is
            # collective.
            self._interrupt()
        log.info("%s received: stopping after this step", signal.Signals(signum).name)

    def _interrupt(self) -> None:
        """Save the state unless already saved, then raise :class:`TrainingInterrupted`."""
        signum = self._stop_signal or signal.SIGINT
        if self._saved_at != (self.epoch, self.iteration):
            self.save_checkpoint()
        where = (f"epoch {self.epoch + 1}, iteration {self.iteration}/{self.iters_per_epoch}"
                 if self.iteration else f"the end of epoch {self.epoch}")
        raise TrainingInterrupted(signum, (
            f"stopped by {signal.Signals(signum).name} at {where}: checkpoint {self.folder.last}; "
            f"resume with: esreid train --resume {self.run_dir}"))

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop; all ranks learn the signal."""
        signum = distributed.broadcast_flag(self.ctx, self._stop_signal or 0)
        if signum and self._stop_signal is None:
            self._stop_signal = signum
        return bool(signum)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            old[signum] = signal.signal(signum, self._on_signal)
        return old

    # --- training ---------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, pids: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One optimisation step on a batch; returns the loss and its parts (in a
        distributed run: their means over the processes, the same on every rank)."""
        self.model.train()
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            loss, terms, info = self.objective(images, pids, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        names = list(terms) + list(info)
        values = torch.stack([loss.detach().float(), *(t.float() for t in terms.values())]).tolist()
        values = distributed.all_mean(self.ctx, values + list(info.values()))
        loss_value, parts = values[0], dict(zip(names, values[1:], strict=True))
        # Before the optimiser step: the weights, and so the last checkpoint, stay good.
        self._check_finite(loss_value, parts)
        if self.scaler.is_enabled():
            # fp16: GradScaler skips a step whose gradients overflowed and lowers its scale.
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.progress.amp_skipped += 1
        else:
            self.optimizer.step()
        return loss_value, parts

    def _precision(self) -> str:
        """The precision the steps run in, as the config names it (``train.amp=...``)."""
        amp = {None: "none", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]
        return f"train.amp={amp}"

    def _check_finite(self, loss_value: float, parts: dict[str, float]) -> None:
        """Stop the run (:class:`TrainingDiverged`) when a loss term, the saliency maps or,
        outside fp16, the gradients of this step are not finite. Every process sees the same
        averaged values and gradients, so all of them stop at the same step."""
        bad = next(((k, v) for k, v in parts.items()
                    if k in self._loss_terms and not math.isfinite(v)), None)
        if bad is None and not math.isfinite(loss_value):
            bad = ("loss", loss_value)
        if bad is None and parts.get("saliency_nonfinite", 0.0) > 0:
            bad = ("saliency maps", f"non-finite in {parts['saliency_nonfinite']:.0%} of the batch")
        if bad is None and not self.scaler.is_enabled() and not self._gradients_finite():
            bad = ("gradients", "non-finite")
        if bad is None:
            return
        term, value = bad
        where = f"epoch {self.epoch + 1}, iteration {self.iteration + 1}/{self.iters_per_epoch}"
        self._log_metrics({"type": "nonfinite", "epoch": self.epoch, "iteration": self.iteration,
                           "term": term, "value": str(value), "amp": self._precision()})
        raise TrainingDiverged(term, f"{term} became {value} at {where} under {self._precision()}; "
                                     f"the step was not applied. {self._resume_hint()}")

    @property
    def _loss_terms(self) -> set[str]:
        return {f"{kind}_{name}" for name in self.model.branches() for kind in ("id", "triplet")}

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        # One norm per tensor and one synchronisation: a non-finite entry makes its norm so.
        return bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float())
                                                for g in grads])).all())

    def _resume_hint(self) -> str:
        """Where the last good state is and the command that continues from it."""
        if self._saved_at is None or not self.folder.last.is_file():
            return ("No checkpoint was written yet: start again with --overwrite (e.g. with "
                    "--set train.amp=none or a lower optim.lr).")
        epoch, iteration = self._saved_at
        at = f"epoch {epoch}" + (f", iteration {iteration}" if iteration else "")
        change = ("--set train.amp=none to go on in float32" if self.amp_dtype is not None
                  else "--set optim.lr=<lower> --force to go on with a lower learning rate")
        return (f"Last good checkpoint: {self.folder.last} ({at}); resume with: "
                f"esreid train --resume {self.run_dir} (add {change}).")

    def _epoch_length(self, epoch: int) -> int:
        """Batches in ``epoch``: the PK sampler's exact count, capped by optim.iters_per_epoch."""
        self.loader.sampler.set_epoch(epoch)
        n = self.loader.sampler.num_batches()
        cap = self.cfg.optim.iters_per_epoch
        return min(n, cap) if cap > 0 else n

    def lr_at(self, epoch: float) -> float:
        """Learning rate at fractional ``epoch`` (warm-up from 0, then step decay)."""
        o = self.cfg.optim
        return o.lr * lr_factor(epoch, o.warmup_epochs, o.milestones, o.gamma)

    def _note_bad_images(self, paths: Any) -> None:
        for path in self.bad_images.update(paths):
            log.warning("skipped unreadable image %s (data.on_bad_image=skip)", path)

    def train_epoch(self) -> EpochStats:
        """Train the rest of the current epoch and return its statistics.

        The learning rate is set before every step from the fractional epoch, so it is a
        pure function of progress (nothing to checkpoint) even though PK epochs vary
        slightly in length. A run restored mid-epoch starts at its saved iteration.
        """
        cfg = self.cfg
        n_iters = self._epoch_length(self.epoch)
        self.iters_per_epoch = n_iters
        first = self.iteration
        self.loader.sampler.set_epoch(self.epoch, start=first * self.batch_size)
        every = cfg.train.checkpoint_every_iters
        acc = self.progress
        # ``start`` counts the epoch's earlier segments (before a resume) into its seconds;
        # the rate shown is this segment's.
        now = time.time()
        start, segment_start, seen_before = now - acc.seconds, now, acc.seen
        bar = tqdm(total=n_iters, initial=first, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                   disable=not (cfg.train.progress and self.is_main), leave=False, unit="it")
        last_batch = None
        self._in_steps = True
        try:
            for it, (images, pids, _camids, _indices, bad) in enumerate(self.loader, start=first):
                if it >= n_iters:
                    break
                self._note_bad_images(bad)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(self.epoch + (it + 1) / n_iters)
                images, pids = images.to(self.device, non_blocking=True), pids.to(self.device)
                loss, parts = self.train_step(images, pids)
                acc.losses.append(loss)
                for k, v in parts.items():
                    acc.sums[k] = acc.sums.get(k, 0.0) + v
                acc.seen += images.shape[0] * self.world_size
                acc.seconds = time.time() - start
                self.iteration = it + 1
                last_batch = (images, pids)
                rate = (acc.seen - seen_before) / max(time.time() - segment_start, 1e-9)
                eta = ((cfg.optim.epochs - self.epoch) * n_iters - self.iteration) * self.batch_size / max(rate, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}", eta=f"{eta / 60:.1f}min")
                bar.update(1)
                if self.iteration < n_iters:
                    if every > 0 and self.iteration % every == 0:
                        self.save_checkpoint()
                    if self._stop_requested():
                        self._interrupt()
        finally:
            self._in_steps = False
            bar.close()
        self.epoch += 1
        self.iteration = 0
        self.progress = _EpochProgress()
        elapsed = max(acc.seconds, 1e-9)
        n = max(len(acc.losses), 1)
        stats = EpochStats(self.epoch, sum(acc.losses) / n, {k: v / n for k, v in acc.sums.items()},
                           self.optimizer.param_groups[0]["lr"], acc.seen / elapsed,
                           elapsed, acc.losses)
        record: dict[str, Any] = {"type": "train", "epoch": self.epoch, "loss": stats.loss,
                                  "lr": stats.lr, "images_per_s": stats.images_per_s,
                                  "seconds": elapsed, **stats.parts}
        if self.scaler.is_enabled():
            record.update(amp_skipped_steps=acc.amp_skipped, amp_scale=self.scaler.get_scale())
        record.update(self._ppool_values())
        if cfg.train.diagnose_erasing and last_batch is not None and self.is_main:
            record.update(self.erased_batch_loss(*last_batch))
        if cfg.data.on_bad_image == "skip":
            record["skipped_images"] = self.bad_images.count
        self._log_metrics(record)
        log.info("epoch %d/%d loss %.4f lr %.2e %.1f img/s %.0fs%s", self.epoch, cfg.optim.epochs,
                 stats.loss, stats.lr, stats.images_per_s, elapsed,
                 "".join(f" {k}={v:.3f}" for k, v in record.items() if k.startswith(("erased", "ppool")))
                 + "".join(f" {k}={v:g}" for k, v in record.items() if k.startswith("amp_")))
        return stats

    def _ppool_values(self) -> dict[str, float]:
        out = {}
        for name, branch in self.model.branches().items():
            l_value = getattr(branch.pool, "l", None)
            if isinstance(l_value, torch.Tensor):
                out[f"ppool_l_{name}"] = float(l_value.detach().float().mean())
        return out

    @torch.no_grad()
    def _branch_loss_eval(self, branch_name: str, images: torch.Tensor, pids: torch.Tensor) -> float:
        branch = self.model.branches()[branch_name]
        out = branch(self.model.trunk(images))
        return float(sum(branch_loss(out, pids, self.cfg.loss).values()))

    def erased_batch_loss(self, images: torch.Tensor, pids: torch.Tensor) -> dict[str, float]:
        """Over-erasing diagnostic (paper Fig. 3): the loss of a BESM-erased batch, forward only.

        Uses the ESB (or the only branch), in eval mode, CG-RAM maps of the batch and the
        run's erasing ratio (0.2 when the run does not erase), every image erased. Returns
        ``erased_loss`` and, for reference, ``clean_loss`` of the same batch.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            name = "esb" if self.model.esb is not None else "aib"
            ratio = self.model.eraser.diagnostic_ratio
            maps = self.model.saliency_maps(images, pids, branch=name)
            erased, _ = besm_erase(images, maps, ratio, 1.0, self.cfg.erase.value)
            return {"erased_loss": self._branch_loss_eval(name, erased, pids),
                    "clean_loss": self._branch_loss_eval(name, images, pids)}
        finally:
            self.model.train(was_training)

    def evaluate(self, features_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Evaluate the current model on the test split; logs and returns the results dict.

        In a distributed run every process embeds a share of the test images and rank 0
        scores them all; the other ranks return None."""
        distributed.broadcast_buffers(self.ctx, self.model)
        result = evaluate_model(self.model, self.eval_data, self.cfg, self.device, features_out,
                                ctx=self.ctx)
        if result is None:
            return None
        result["train_dataset"] = self.data.name
        result["epoch"] = self.epoch
        result["world_size"] = self.world_size
        self._log_metrics({"type": "eval", "epoch": self.epoch, **result["metrics"]})
        log.info("eval epoch %d: %s", self.epoch, format_metrics(result["metrics"]))
        if self._tensorboard() is not None and self._tb_batch is not None:
            images, pids = (t.to(self.device) for t in self._tb_batch)
            maps = cgram_overlay_batch(self.model, images, pids)
            self._tb.log_overlays("cgram/train", images, maps, step=self.epoch)
        return result

    def finished_results(self) -> dict[str, Any] | None:
        """The run's ``results.json`` when training is complete and it was evaluated at the
        final epoch; None otherwise."""
        if self.epoch < self.cfg.optim.epochs or self.iteration or not self.folder.results.is_file():
            return None
        try:
            result = json.loads(self.folder.results.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return result if result.get("epoch") == self.epoch else None

    def fit(self, evaluate: bool = True) -> dict[str, Any] | None:
        """Train the remaining epochs, checkpointing as configured; evaluate at the end.

        Returns the final results dict (also written to ``results.json``) or None when
        ``evaluate`` is False. A run that is already finished is left as it is (its results
        are returned). SIGTERM/SIGINT raise :class:`TrainingInterrupted` after saving.
        """
        cfg = self.cfg
        done = self.finished_results()
        if done is not None:
            log.info("run %s is already finished (epoch %d/%d); results: %s", self.run_dir,
                     self.epoch, cfg.optim.epochs, self.folder.results)
            return done if evaluate else None
        self._stop_signal = None
        old_handlers = self._install_signal_handlers()
        try:
            log.info("run folder %s: %s on %s (%d train images, %d ids), %d epochs x %d iters, "
                     "device %s", self.run_dir, cfg.name, self.data.name, len(self.data.train),
                     self.num_classes, cfg.optim.epochs, self.iters_per_epoch, self.device)
            while self.epoch < cfg.optim.epochs:
                self.train_epoch()
                last = self.epoch == cfg.optim.epochs
                every = cfg.train.checkpoint_every
                if last or (every > 0 and self.epoch % every == 0) or cfg.train.checkpoint_every_iters > 0:
                    self.save_checkpoint()
                if self._stop_requested():
                    self._interrupt()
                if evaluate and not last and cfg.train.eval_every > 0 and self.epoch % cfg.train.eval_every == 0:
                    self.evaluate()
            if self._saved_at != (self.epoch, self.iteration):
                self.save_checkpoint()  # e.g. a finished run resumed with more epochs, then none
            if not evaluate:
                return None
            return self.evaluate_and_save()
        finally:
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            if self._tb:
                self._tb.close()

    def evaluate_and_save(self, features_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
        """Final evaluation: :meth:`evaluate`, then write ``run_dir/results.json`` (rank 0;
        the other ranks of a distributed run return None)."""
        result = self.evaluate(features_out)
        if result is None:
            return None
        result["run_dir"] = str(self.run_dir)
        if self.cfg.data.on_bad_image == "skip":
            result["skipped_images"] = {"train": self.bad_images.count,
                                        **result.get("skipped_images", {})}
        write_results(self.folder.results, result)
        return result

