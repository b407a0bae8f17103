"""What the training benchmarks share: a real Trainer on a small synthetic benchmark, timed
through its own ``train_step`` on a fixed random batch.

Timing the Trainer's step, rather than a re-implementation of it, means the figures include
exactly what training runs: the optimiser's parameter groups, autocast and the gradient
scaler (``train.amp``), the memory format (``train.channels_last``), ``train.compile``.

The Trainer needs a dataset to start: the embedded synthetic benchmark is generated into the
caller's work folder with twice as many identities as the timed batch has (its first half is
the training split), at least 16. So the classifier has ``max(ids, 8)`` classes rather than a
real benchmark's hundreds; at 2048 x C weights per branch that is a negligible part of a
step. The data loader is never used: every step sees the same batch, already on the device.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from esreid.config import load_config
from esreid.data.synthetic import ensure_synthetic
from esreid.engine.trainer import Trainer

#: Keys every benchmark Trainer gets: no weights to download, no progress bar, no event
#: files, no worker processes, no per-epoch diagnostic (no epoch ever ends here).
BENCH_OVERRIDES = [
    "model.pretrained=none",
    "data.name=synthetic",
    "data.num_workers=0",
    "train.progress=false",
    "train.tensorboard=false",
    "train.diagnose_erasing=false",
]


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_description(device: str | torch.device) -> str:
    """One line naming the card (or the CPU model and torch's thread count) and torch."""
    device = torch.device(device)
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        what = f"CPU {_cpu_model()}, {torch.get_num_threads()} threads"
    return f"{what}, torch {torch.__version__}"


def _cpu_model() -> str:
    # platform.processor() is often empty or just the architecture on Linux.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fixed_batch(ids: int, instances: int, height: int, width: int,
                device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The timed batch: seeded random images and pids ``arange(ids)`` each ``instances`` times."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(ids * instances, 3, height, width, generator=gen)
    pids = torch.arange(ids).repeat_interleave(instances)
    return images.to(device), pids.to(device)


def prepare_data(workdir: Path, ids: int) -> tuple[Path, int]:
    """Generate the synthetic benchmark under ``workdir``; returns its root and the number of
    identities it was generated with (the training split has half of them)."""
    synth_ids = 2 * max(ids, 8)
    root = workdir / "data"
    ensure_synthetic(root, progress=False, num_ids=synth_ids, seed=0)
    return root, synth_ids


class TrainerStep:
    """A Trainer for ``preset`` + ``overrides`` in its own run folder; :meth:`step` times one
    call of ``trainer.train_step`` on the given batch."""

    def __init__(self, preset: str, overrides: list[str], *, backbone: str, device: str,
                 images: torch.Tensor, pids: torch.Tensor, instances: int,
                 data_root: Path, synth_ids: int, run_dir: Path) -> None:
        ids = len(pids) // instances
        height, width = images.shape[-2:]
        cfg = load_config(preset, [
            *BENCH_OVERRIDES,
            f"data.root={data_root}", f"data.synth_ids={synth_ids}",
            f"data.height={height}", f"data.width={width}",
            f"data.ids_per_batch={ids}", f"data.num_instances={instances}",
            f"model.backbone={backbone}", f"train.device={device}",
            *overrides,
        ])
        self.cfg = cfg
        self.trainer = Trainer(cfg, data=None, run_dir=run_dir)
        # The Trainer logs INFO lines to stderr (it set them up for a run); here they would
        # only interleave with the table. Warnings still show.
        logging.getLogger("esreid").setLevel(logging.WARNING)
        self.device = self.trainer.device
        self.images = images.to(self.device)
        self.pids = pids.to(self.device)

    def step(self) -> float:
        """Seconds of one ``Trainer.train_step`` (forward, Eq. 1, backward, optimiser)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.trainer.train_step(self.images, self.pids)
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
