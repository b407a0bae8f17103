"""Why ES-Net does (not) beat Base in an `esreid study`: the checks of docs/experiments.md.

    python benchmarks/study_diagnostics.py runs/study

Reads a finished study folder (``esreid study --out runs/study``) and writes, beside its
summary:

- ``diagnostics.json``:
  - ``by_part``: for every run, rank-1/mAP of the queries grouped by the part their occluded
    version has covered, clean and occluded (which missing part costs most, and whom);
  - ``branches``: for each ES-Net run, rank-1/mAP on normal and occluded queries of the
    whole descriptor, of its AIB half and of its ESB half, and the mean norm of each half;
  - ``bn_recalibrated``: the same for every run after its BatchNorm statistics were
    recomputed on clean training images (is the evaluation hurt by statistics that erased
    images entered, as ``erase.reuse_clean`` lets them?);
  - ``erasing_control``: for each ES-Net run (and its initialisation, and seed 0 after one
    epoch), the ESB's loss on 8 training batches clean, with the top 20% CG-RAM pixels erased,
    with 20% erased by random maps of the same shape, and with the least salient 20% erased.
    CG-RAM is informative when its erasure costs clearly more than the random one.
- ``saliency.png``: CG-RAM maps of the ESB and what BESM erases for six training images, at
  initialisation, after epoch 1 and at the end (seed 0).

The epoch-1 model is trained again from the seed-0 run's config (one epoch, same seed: the same
weights as the run had after its first epoch, on CPU) into ``<study>/diagnostics/``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esreid.config import load_config
from esreid.data import load_dataset
from esreid.data.loader import build_train_loader
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from esreid.engine.checkpoint import model_from_checkpoint
from esreid.engine.evaluate import camera_filter_labels, embed_records
from esreid.engine.objective import branch_loss
from esreid.engine.trainer import Trainer
from esreid.metrics import compute_distance, evaluate_rank
from esreid.models import build_model
from esreid.saliency.erasing import besm_erase
from esreid.saliency.visualize import denormalize, overlay_heatmap
from esreid.utils import atomic_write_json


def _scores(qf, gf, query, gallery) -> list[float]:
    """[rank-1, mAP] in percent for descriptors of ``query`` against ``gallery``."""
    q_pids, g_pids = np.array([r.pid for r in query]), np.array([r.pid for r in gallery])
    q_cams, g_cams = camera_filter_labels(np.array([r.camid for r in query]),
                                          np.array([r.camid for r in gallery]))
    res = evaluate_rank(compute_distance(qf, gf, metric="cosine"), q_pids, g_pids, q_cams,
                        g_cams).to_dict()
    return [round(100 * res["rank1"], 1), round(100 * res["mAP"], 1)]


def _batches(data, cfg, count: int, seed: int) -> list:
    """``count`` PK training batches of clean images (fixed seed, no flips beyond the usual)."""
    loader = build_train_loader(data.train, cfg.data.height, cfg.data.width,
                                batch_size=cfg.data.ids_per_batch * cfg.data.num_instances,
                                num_instances=cfg.data.num_instances, num_workers=0, seed=seed,
                                flip_prob=cfg.data.flip_prob)
    loader.sampler.set_epoch(0)
    return [b for _, b in zip(range(count), loader, strict=False)]


def _recalibrated(model, batches):
    """A copy of ``model`` whose BatchNorm statistics are the plain average over ``batches``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for images, *_ in batches:
            model(images)
    return model.eval()


def _evaluate(model, cfg, normal, occluded, part_of: dict[str, str]) -> dict:
    """Scores of the whole descriptor (and of each branch's half) on both query sets, and of
    the whole descriptor per occluded part (the same queries, clean and occluded)."""
    with torch.no_grad():
        gf = embed_records(model, normal.gallery, cfg, "cpu")[0]
        qn = embed_records(model, normal.query, cfg, "cpu")[0]
        qo = embed_records(model, occluded.query, cfg, "cpu")[0]
    halves = {"all": slice(None)}
    if len(model.branches()) == 2:
        d = model.aib.neck.bn.num_features  # the descriptor is [AIB | ESB]
        halves.update(aib=slice(0, d), esb=slice(d, None))
    out = {name: {"normal": _scores(qn[:, s], gf[:, s], normal.query, normal.gallery),
                  "occluded": _scores(qo[:, s], gf[:, s], occluded.query, occluded.gallery)}
           for name, s in halves.items()}
    if len(halves) > 1:
        out["norms"] = {k: round(float(gf[:, halves[k]].norm(dim=1).mean()), 3)
                        for k in ("aib", "esb")}
    parts = [part_of[Path(r.path).name] for r in occluded.query]
    out["by_part"] = {}
    for part in sorted(set(parts)):
        rows = [i for i, p in enumerate(parts) if p == part]
        query = [occluded.query[i] for i in rows]
        out["by_part"][part] = {"queries": len(rows),
                                "normal": _scores(qn[rows], gf, query, normal.gallery),
                                "occluded": _scores(qo[rows], gf, query, occluded.gallery)}
    return out


def _erasing_control(model, cfg, batches, generator) -> dict:
    """Mean ESB loss over ``batches``: clean and with 20% erased three ways."""
    model.eval()
    sums = dict.fromkeys(("clean", "cgram", "random", "least_salient"), 0.0)
    for images, pids, *_ in batches:
        maps = model.saliency_maps(images, pids, branch="esb")
        noise = torch.rand(maps.shape, generator=generator)
        with torch.no_grad():
            for key, x in (("clean", images),
                           ("cgram", besm_erase(images, maps, 0.2, 1.0)[0]),
                           ("random", besm_erase(images, noise, 0.2, 1.0)[0]),
                           ("least_salient", besm_erase(images, -maps, 0.2, 1.0)[0])):
                out = model.esb(model.trunk(x))
                sums[key] += float(sum(branch_loss(out, pids, cfg.loss).values()))
    return {k: round(v / len(batches), 3) for k, v in sums.items()}


def _epoch1_model(study: Path, run: Path):
    """The seed-0 ES-Net run's model after one epoch, trained again into diagnostics/."""
    cfg = load_config(run / "config.yaml", ["optim.epochs=1",
                                            f"train.output_dir={study / 'diagnostics'}",
                                            f"train.run_name={run.name}_epoch1"])
    folder = study / "diagnostics" / f"{run.name}_epoch1"
    checkpoint = folder / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        Trainer(cfg, overwrite=True).fit(evaluate=False)
    return model_from_checkpoint(checkpoint, cfg)


def _saliency_figure(models: list, images, pids, cfg, path: Path) -> None:
    """CG-RAM overlay and BESM-erased image for six images, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [0, 4, 8, 12, 16, 20]
    rgb = denormalize(images, IMAGENET_MEAN, IMAGENET_STD)
    fig, axes = plt.subplots(len(models), 2 * len(show), figsize=(2.0 * len(show), 2.3 * len(models)))
    for row, (title, model) in enumerate(models):
        model.eval()
        maps = model.saliency_maps(images, pids, branch="esb")
        erased = denormalize(besm_erase(images, maps, cfg.erase.ratio, 1.0, cfg.erase.value)[0],
                             IMAGENET_MEAN, IMAGENET_STD)
        up = torch.nn.functional.interpolate(maps[:, None], size=images.shape[2:],
                                             mode="bilinear", align_corners=False)[:, 0]
        for k, i in enumerate(show):
            m = (up[i] - up[i].min()) / (up[i].max() - up[i].min() + 1e-12)
            axes[row, 2 * k].imshow(overlay_heatmap(rgb[i], m))
            axes[row, 2 * k + 1].imshow(erased[i].permute(1, 2, 0).numpy())
        axes[row, 0].set_ylabel(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for k in range(len(show)):
        axes[0, 2 * k].set_title("CG-RAM", fontsize=7)
        axes[0, 2 * k + 1].set_title("erased", fontsize=7)
    h, w = images.shape[2:]
    fig.suptitle(f"ES-Net, seed 0: ESB saliency (CG-RAM at {cfg.erase.layer}, input {h}x{w}) "
                 f"and the top {100 * cfg.erase.ratio:.0f}% of pixels BESM erases", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    plt.close(fig)
    # The noisy synthetic textures make a true-colour PNG of this figure about 650 kB; 256
    # colours keep it readable at a fifth of that.
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    """Run every check on a finished study folder; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="folder of a finished `esreid study`")
    args = parser.parse_args(argv)
    study = args.study
    runs = sorted((study / "runs").glob("*_seed*"))
    if not (study / "study.json").is_file() or not runs:
        print(f"{study} holds no finished study (study.json and runs/*_seed*)", file=sys.stderr)
        return 2
    normal = load_dataset("synthetic", study / "synthetic")
    occluded = load_dataset("synthetic", study / "synthetic_occluded")
    manifest = json.loads((study / "synthetic_occluded" / "synthetic.json").read_text())
    part_of = {q["file"]: q["part"] for q in manifest["occluded_queries"]}
    report: dict = {"by_part": {}, "branches": {}, "bn_recalibrated": {},
                    "erasing_control": {}}
    for run in runs:
        cfg = load_config(run / "config.yaml")
        model = model_from_checkpoint(run / "checkpoints" / "last.pt", cfg).eval()
        trained = _evaluate(model, cfg, normal, occluded, part_of)
        report["by_part"][run.name] = trained.pop("by_part")
        recalibrated = _recalibrated(model, _batches(normal, cfg, 30, seed=123))
        report["bn_recalibrated"][run.name] = {
            "trained": trained["all"],
            "recalibrated": _evaluate(recalibrated, cfg, normal, occluded, part_of)["all"]}
        print(run.name, json.dumps(report["bn_recalibrated"][run.name]), flush=True)
        if not run.name.startswith("esnet_"):
            continue
        report["branches"][run.name] = trained
        control = _batches(normal, cfg, 8, seed=11)
        # One stream per run, so that a run's figures do not depend on which runs came first.
        generator = torch.Generator().manual_seed(5)
        torch.manual_seed(cfg.train.seed)
        init = build_model(cfg.model, normal.num_train_pids, cfg.erase)
        checks = [("initialisation", init)]
        if run.name == "esnet_seed0":
            checks.append(("after epoch 1", _epoch1_model(study, run)))
            images, pids = control[0][:2]
            _saliency_figure([*checks, ("after the last epoch", model)], images, pids, cfg,
                             study / "saliency.png")
        checks.append(("after the last epoch", model))
        report["erasing_control"][run.name] = {
            name: _erasing_control(m, cfg, control, generator) for name, m in checks}
        print(run.name, json.dumps(report["erasing_control"][run.name]), flush=True)
    atomic_write_json(study / "diagnostics.json", report)
    print(f"wrote {study / 'diagnostics.json'} and {study / 'saliency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
