"""The training loop: data, model, Eq. 1 loss, Adam with warm-up + step decay, checkpoints.

A run folder (``train.output_dir/run_name``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per epoch / evaluation), ``log.txt``, ``checkpoints/``
and, after the final evaluation, ``results.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from esreid import __version__
from esreid.config import Config, save_config
from esreid.data import load_dataset
from esreid.data.loader import build_train_loader
from esreid.data.records import ReIDData
from esreid.engine.evaluate import evaluate_model, format_metrics
from esreid.engine.objective import branch_loss, total_loss
from esreid.engine.schedule import lr_factor
from esreid.metrics import write_results
from esreid.models.esnet import ESNet, build_model
from esreid.saliency import besm_erase
from esreid.utils import (
    atomic_torch_save,
    atomic_write_text,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_run_logging,
)

log = logging.getLogger("esreid.train")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def load_data(cfg: Config) -> ReIDData:
    """Load ``cfg.data.name`` from ``cfg.data.root`` and return its splits.

    The synthetic benchmark is generated first when ``data.root`` holds none.
    """
    name, root = cfg.data.name, Path(cfg.data.root).expanduser()
    if name == "synthetic":
        from esreid.data.synthetic import MANIFEST_NAME, ensure_synthetic

        # An existing generated benchmark is used as it is (whatever its size); only a
        # missing one is generated from data.synth_ids / data.synth_seed.
        if not (root / MANIFEST_NAME).is_file():
            root = ensure_synthetic(root, num_ids=cfg.data.synth_ids, seed=cfg.data.synth_seed)
    options: dict[str, Any] = {}
    if name == "vehicleid":
        options["test_size"] = cfg.data.test_size
    if name == "custom" and cfg.data.cam_pattern:
        options["cam_pattern"] = cfg.data.cam_pattern
    return load_dataset(name, root, **options)


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


class Trainer:
    """Holds the state of a run and trains it epoch by epoch.

    ``Trainer(cfg)`` builds everything; :meth:`fit` trains to ``cfg.optim.epochs`` (resuming
    from a checkpoint when :meth:`load_checkpoint` was called) and evaluates at the end.
    """

    def __init__(self, cfg: Config, data: ReIDData | None = None, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.train.output_dir) / (cfg.train.run_name or cfg.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_run_logging(self.run_dir)
        save_config(cfg, self.run_dir / "config.yaml")

        self.data = data if data is not None else load_data(cfg)
        if not self.data.train:
            raise ValueError(f"dataset {self.data.name}: the training split is empty")
        self.num_classes = self.data.num_train_pids
        d = cfg.data
        self.loader = build_train_loader(
            self.data.train, d.height, d.width, batch_size=d.ids_per_batch * d.num_instances,
            num_instances=d.num_instances, num_workers=d.num_workers, seed=cfg.train.seed,
            flip_prob=d.flip_prob, pad=d.pad,
        )
        self.iters_per_epoch = self._epoch_length(0)
        if self.iters_per_epoch < 1:
            raise ValueError("the training split is too small for one batch "
                             f"of {d.ids_per_batch} ids x {d.num_instances} images")

        self.model: ESNet = build_model(cfg.model, self.num_classes, cfg.erase).to(self.device)
        # P-pooling's exponent is excluded from weight decay, which would pull it towards
        # an arbitrary value of its parametrisation rather than towards "no pooling change".
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("raw_l") else decay).append(p)
        self.optimizer = torch.optim.Adam(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 1)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0  # completed epochs
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # --- bookkeeping ------------------------------------------------------------------

    def _trim_metrics_log(self) -> None:
        """Drop records of epochs after the current one (a restart from scratch drops all),
        so a re-run or a resumed run does not repeat epochs in ``metrics.jsonl``."""
        if not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= self.epoch]
        if self.epoch == 0:
            kept = []
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Write model, optimiser, epoch and RNG states atomically; returns the path."""
        path = Path(path) if path else self.run_dir / "checkpoints" / "last.pt"
        atomic_torch_save({
            "esreid_version": __version__,
            "epoch": self.epoch,
            "num_classes": self.num_classes,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "generator": self.generator.get_state(),
        }, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` to continue training."""
        ckpt = read_checkpoint(path)
        load_model_state(self.model, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.generator.set_state(ckpt["generator"])
        self.epoch = int(ckpt["epoch"])
        log.info("resumed from %s at epoch %d", path, self.epoch)

    # --- training ---------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, pids: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One optimisation step on a batch; returns the loss and its parts."""
        self.model.train()
        with torch.autocast(self.device.type, enabled=self.use_amp):
            out = self.model.forward_train(images, pids, generator=self.generator)
            loss, parts = total_loss(out, pids, self.cfg.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {self.epoch + 1}: {parts}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        parts.update(out.info)
        return float(loss.detach()), parts

    def _epoch_length(self, epoch: int) -> int:
        """Batches in ``epoch``: the PK sampler's exact count, capped by optim.iters_per_epoch."""
        self.loader.sampler.set_epoch(epoch)
        n = len(self.loader)
        cap = self.cfg.optim.iters_per_epoch
        return min(n, cap) if cap > 0 else n

    def lr_at(self, epoch: float) -> float:
        """Learning rate at fractional ``epoch`` (warm-up from 0, then step decay)."""
        o = self.cfg.optim
        return o.lr * lr_factor(epoch, o.warmup_epochs, o.milestones, o.gamma)

    def train_epoch(self) -> EpochStats:
        """Train one epoch and return its statistics.

        The learning rate is set before every step from the fractional epoch, so it is a
        pure function of progress (nothing to checkpoint) even though PK epochs vary
        slightly in length.
        """
        cfg = self.cfg
        n_iters = self._epoch_length(self.epoch)
        self.iters_per_epoch = n_iters
        start, seen = time.time(), 0
        losses: list[float] = []
        sums: dict[str, float] = {}
        bar = tqdm(total=n_iters, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                   disable=not cfg.train.progress, leave=False, unit="it")
        last_batch = None
        for it, (images, pids, *_rest) in enumerate(self.loader):
            if it >= n_iters:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.epoch + (it + 1) / n_iters)
            images, pids = images.to(self.device, non_blocking=True), pids.to(self.device)
            loss, parts = self.train_step(images, pids)
            losses.append(loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            seen += images.shape[0]
            elapsed = time.time() - start
            remaining_iters = (cfg.optim.epochs - self.epoch) * n_iters - (it + 1)
            eta = remaining_iters * elapsed / (it + 1)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / elapsed:.1f}",
                            eta=f"{eta / 60:.1f}min")
            bar.update(1)
            last_batch = (images, pids)
        bar.close()
        self.epoch += 1
        elapsed = time.time() - start
        n = max(len(losses), 1)
        stats = EpochStats(self.epoch, sum(losses) / n, {k: v / n for k, v in sums.items()},
                           self.optimizer.param_groups[0]["lr"], seen / max(elapsed, 1e-9),
                           elapsed, losses)
        record: dict[str, Any] = {"type": "train", "epoch": self.epoch, "loss": stats.loss,
                                  "lr": stats.lr, "images_per_s": stats.images_per_s,
                                  "seconds": elapsed, **stats.parts}
        record.update(self._ppool_values())
        if cfg.train.diagnose_erasing and last_batch is not None:
            record.update(self.erased_batch_loss(*last_batch))
        self._log_metrics(record)
        log.info("epoch %d/%d loss %.4f lr %.2e %.1f img/s %.0fs%s", self.epoch, cfg.optim.epochs,
                 stats.loss, stats.lr, stats.images_per_s, elapsed,
                 "".join(f" {k}={v:.3f}" for k, v in record.items() if k.startswith(("erased", "ppool"))))
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
            ratio = self.cfg.erase.ratio if self.cfg.erase.method in ("besm", "gradcam") else 0.2
            maps = self.model.saliency_maps(images, pids, branch=name)
            erased, _ = besm_erase(images, maps, ratio, 1.0, self.cfg.erase.value)
            return {"erased_loss": self._branch_loss_eval(name, erased, pids),
                    "clean_loss": self._branch_loss_eval(name, images, pids)}
        finally:
            self.model.train(was_training)

    def evaluate(self, features_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Evaluate the current model on the test split; logs and returns the results dict."""
        result = evaluate_model(self.model, self.data, self.cfg, self.device, features_out)
        result["epoch"] = self.epoch
        self._log_metrics({"type": "eval", "epoch": self.epoch, **result["metrics"]})
        log.info("eval epoch %d: %s", self.epoch, format_metrics(result["metrics"]))
        return result

    def fit(self, evaluate: bool = True) -> dict[str, Any] | None:
        """Train the remaining epochs, checkpointing as configured; evaluate at the end.

        Returns the final results dict (also written to ``results.json``) or None when
        ``evaluate`` is False.
        """
        cfg = self.cfg
        self._trim_metrics_log()
        log.info("run folder %s: %s on %s (%d train images, %d ids), %d epochs x %d iters, device %s",
                 self.run_dir, cfg.name, self.data.name, len(self.data.train), self.num_classes,
                 cfg.optim.epochs, self.iters_per_epoch, self.device)
        while self.epoch < cfg.optim.epochs:
            self.train_epoch()
            last = self.epoch == cfg.optim.epochs
            if last or (cfg.train.checkpoint_every > 0 and self.epoch % cfg.train.checkpoint_every == 0):
                self.save_checkpoint()
            if evaluate and not last and cfg.train.eval_every > 0 and self.epoch % cfg.train.eval_every == 0:
                self.evaluate()
        if not evaluate:
            return None
        return self.evaluate_and_save()

    def evaluate_and_save(self, features_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Final evaluation: :meth:`evaluate`, then write ``run_dir/results.json``."""
        result = self.evaluate(features_out)
        result["run_dir"] = str(self.run_dir)
        write_results(self.run_dir / "results.json", result)
        return result


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (on CPU) and check it is an esreid checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an esreid checkpoint (no 'model' entry)")
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


def model_from_checkpoint(cfg: Config, path: Path) -> ESNet:
    """Build the model ``cfg`` describes and load trained weights from ``path``.

    ImageNet weights are not loaded (the checkpoint replaces them).
    """
    ckpt = read_checkpoint(path)
    num_classes = int(ckpt.get("num_classes", 0))
    if num_classes < 1:
        raise CheckpointError(f"{path} does not record num_classes")
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "pretrained": "none"})
    model = build_model(model_cfg, num_classes, cfg.erase)
    load_model_state(model, ckpt, path)
    return model
