"""The ``esreid`` command: train, evaluate, sweep, synth, demo, study, plot, report, explain."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from esreid import __version__
from esreid.commands.gallery import add_parsers as add_gallery_parsers


def _add_config_args(p: argparse.ArgumentParser, required: bool = True,
                     config_help: str = "") -> None:
    p.add_argument("--config", required=required,
                   help=config_help or "a preset name (see `esreid presets`) or a path to a YAML file")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE",
                   help="override config keys, e.g. --set data.root=~/datasets optim.epochs=60")


def _cmd_presets(args: argparse.Namespace) -> int:
    from esreid.config import list_presets, load_config
    from esreid.models.erasers import eraser_from_config

    for name in list_presets():
        cfg = load_config(name)
        m = cfg.model
        branches = " + ".join(f"{b}({pool})" for b, on, pool in
                              (("AIB", m.aib, m.aib_pool), ("ESB", m.esb, m.esb_pool)) if on)
        described = eraser_from_config(cfg.erase).describe()
        erase = f" erase={described}" if described else ""
        kind = "weighted triplet" if cfg.loss.triplet_kind == "weighted" else "triplet"
        losses = f"ID+{kind}" if cfg.loss.triplet else "ID"
        if any(m.non_local):
            branches = f"non-local{m.non_local} " + branches
        print(f"{name:24s} {m.backbone} {branches} {losses}{erase} "
              f"{cfg.data.height}x{cfg.data.width} {cfg.optim.epochs}ep")
    return 0


def _resume_folder(args: argparse.Namespace):
    """The run folder ``--resume`` names: ``auto`` (the config's run folder), a run folder,
    or a checkpoint inside a run folder's ``checkpoints/``."""
    from esreid.config import ConfigError, load_config
    from esreid.engine.checkpoint import RunFolder

    if args.resume == "auto":
        if not args.config:
            raise ConfigError("--resume auto finds the run folder from --config (and "
                              "train.output_dir / train.run_name): pass --config, or pass the "
                              "run folder itself: --resume runs/NAME")
        cfg = load_config(args.config, args.overrides)
        folder = RunFolder(Path(cfg.train.output_dir) / (cfg.train.run_name or cfg.name))
        if not folder.contents():
            raise ConfigError(f"nothing to resume: {folder.path} holds no run (start it "
                              "without --resume)")
        return folder, "auto"
    target = Path(os.path.expandvars(args.resume)).expanduser()
    if target.is_dir():
        folder = RunFolder(target)
        if not folder.contents():
            raise ConfigError(f"nothing to resume: {target} holds no run")
        return folder, "auto"
    if not target.exists():
        raise ConfigError(f"--resume {args.resume}: no such run folder or checkpoint")
    folder = RunFolder.of_checkpoint(target)
    if folder is None:
        raise ConfigError(f"--resume {target}: the checkpoint is not inside a run folder "
                          "(<run>/checkpoints/); pass the run folder, or start a new run")
    return folder, target


def _cmd_train(args: argparse.Namespace) -> int:
    from esreid.engine import distributed

    try:
        return _train(args)
    finally:
        distributed.cleanup()  # under torchrun: leave the process group cleanly


def _train(args: argparse.Namespace) -> int:
    from esreid.config import ConfigError, load_config
    from esreid.engine.checkpoint import config_from_checkpoint, find_resume_checkpoint
    from esreid.engine.evaluate import format_metrics
    from esreid.engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        folder, checkpoint = _resume_folder(args)
        # The run's own config, changed only where --set says so.
        if folder.config.is_file():
            cfg = load_config(folder.config, args.overrides)
        else:
            path, ckpt = find_resume_checkpoint(folder)
            cfg = config_from_checkpoint(ckpt, path, args.overrides)
        # The folder's location wins over the one saved in it (a moved or copied run).
        cfg.train.output_dir, cfg.train.run_name = str(folder.path.parent), folder.path.name
        trainer = Trainer(cfg, run_dir=folder.path, resume=checkpoint, force=args.force)
    else:
        if not args.config:
            raise ConfigError("pass --config (a preset or a YAML file), or --resume")
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, overwrite=args.overwrite)
    try:
        result = trainer.fit(evaluate=not args.no_eval)
    except (TrainingInterrupted, TrainingDiverged) as stop:
        if trainer.is_main:
            print(f"esreid train: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    if result is not None:  # None on the other ranks of a distributed run
        print(f"{cfg.name}: {format_metrics(result['metrics'])}")
        print(f"results: {trainer.folder.results}")
    return 0


def _checkpoint_and_config(args: argparse.Namespace):
    """The checkpoint named by ``--checkpoint``, read, and the config to use with it: the
    checkpoint's own, or ``--config``; ``--set`` applies to either."""
    from esreid.config import load_config
    from esreid.engine.checkpoint import config_from_checkpoint, read_checkpoint

    path = Path(os.path.expandvars(args.checkpoint)).expanduser()
    ckpt = read_checkpoint(path)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = config_from_checkpoint(ckpt, path, args.overrides)
    return path, ckpt, cfg


def _label_with_the_trained_config(result: dict, ckpt: dict, cfg) -> None:
    """Results say which experiment was trained (the checkpoint's config: the report's
    paper row), not which config evaluated it; a different ``--config`` is kept as
    ``eval_config``."""
    trained = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    name = trained.get("name")
    if not isinstance(name, str) or not name or name == cfg.name:
        return
    run_name = (trained.get("train") or {}).get("run_name") if isinstance(
        trained.get("train"), dict) else None
    result["config"] = name
    result["run"] = run_name or name
    result["eval_config"] = cfg.name
    result["train_dataset"] = (trained.get("data") or {}).get("name", result["train_dataset"])


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from esreid.engine.checkpoint import evaluation_results_path, model_from_checkpoint
    from esreid.engine.data import check_data, load_eval_data
    from esreid.engine.evaluate import evaluate_model, format_metrics
    from esreid.metrics import write_results
    from esreid.utils import resolve_device

    path, ckpt, cfg = _checkpoint_and_config(args)
    data = load_eval_data(cfg)  # eval.dataset / eval.root: cross-domain testing
    check_data(data, cfg, training=False)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(path, cfg, ckpt=ckpt).to(device)
    with torch.no_grad():
        result = evaluate_model(model, data, cfg, device)
    result["checkpoint"] = str(path)
    result["epoch"] = int(ckpt.get("epoch", 0))
    result["train_dataset"] = cfg.data.name
    _label_with_the_trained_config(result, ckpt, cfg)
    out = (Path(os.path.expandvars(args.out)).expanduser() if args.out
           else evaluation_results_path(path, data.name, cfg.eval.rerank))
    write_results(out, result)
    print(f"{result['config']} on {data.name}: {format_metrics(result['metrics'])}")
    print(f"results: {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from esreid.config import ConfigError, load_config
    from esreid.engine.checkpoint import RunFolder
    from esreid.engine.data import check_data, load_data
    from esreid.engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted
    from esreid.metrics import build_report

    # Every value is checked, and every run folder is free, before the first run trains.
    cfgs = []
    for value in args.values:
        try:
            cfg = load_config(args.config, args.overrides + [f"{args.param}={value}"])
        except ConfigError as err:
            raise ConfigError(f"--values {value}: {err}") from err
        cfg.train.run_name = f"{cfg.train.run_name or cfg.name}_{args.param.split('.')[-1]}{value}"
        folder = RunFolder(Path(cfg.train.output_dir) / cfg.train.run_name)
        if folder.contents() and not args.overwrite:
            raise ConfigError(f"run folder {folder.path} already holds a run: pass --overwrite "
                              "to replace the sweep's runs, or --set train.run_name=NEW")
        cfgs.append(cfg)
    data = load_data(cfgs[0])
    for cfg in cfgs:
        check_data(data, cfg)
    paths = []
    for cfg in cfgs:
        trainer = Trainer(cfg, data=data if cfg.data == cfgs[0].data else None,
                          overwrite=args.overwrite)
        try:
            trainer.fit()
        except (TrainingInterrupted, TrainingDiverged) as stop:
            print(f"esreid sweep: {stop}", file=sys.stderr, flush=True)
            return stop.exit_code
        paths.append(trainer.run_dir)
    print(build_report(paths, with_paper=False))
    return 0


# generate_synthetic's parameter names -> the synth command's options, for its error lines.
_SYNTH_OPTIONS = {"num_ids": "--ids", "num_cams": "--cams", "height": "--height",
                  "width": "--width", "seed": "--seed", "occlude_queries": "--occlude-queries",
                  "dominant_cue": "--dominant-cue", "change_queries": "--change-queries"}


def _cmd_synth(args: argparse.Namespace) -> int:
    from esreid.data.synthetic import generate_synthetic

    try:
        summary = generate_synthetic(Path(args.out), num_ids=args.ids, num_cams=args.cams,
                                     height=args.height, width=args.width, seed=args.seed,
                                     occlude_queries=args.occlude_queries,
                                     dominant_cue=args.dominant_cue,
                                     change_queries=args.change_queries)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        if name in _SYNTH_OPTIONS:
            raise ValueError(f"{_SYNTH_OPTIONS[name]} {rest}") from err
        raise
    print(f"wrote the synthetic benchmark to {args.out}: {summary}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from esreid.demo import run_demo

    run_demo(out_dir=Path(args.out), quick=args.quick)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from esreid.engine.trainer import TrainingDiverged, TrainingInterrupted
    from esreid.study import run_study

    try:
        run_study(out_dir=Path(os.path.expandvars(args.out)).expanduser(), models=args.models,
                  seeds=args.seeds, settings=args.overrides, design=args.design)
    except TrainingInterrupted as stop:
        print(f"esreid study: {stop}; run the same esreid study command again to go on",
              file=sys.stderr, flush=True)
        return stop.exit_code
    except TrainingDiverged as stop:
        print(f"esreid study: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from esreid.plot import plot_run

    for run in args.runs:
        for path in plot_run(Path(run)):
            print(path)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from esreid.metrics import build_report

    print(build_report([Path(p) for p in args.runs], with_paper=not args.no_paper))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from esreid.engine.checkpoint import explanations_dir
    from esreid.explain import explain_queries

    path, ckpt, cfg = _checkpoint_and_config(args)
    out = Path(os.path.expandvars(args.out)).expanduser() if args.out else explanations_dir(path)
    for written in explain_queries(cfg, path, ckpt=ckpt, num_queries=args.queries,
                                   top_k=args.top_k, out_dir=out):
        print(written)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``esreid`` command."""
    parser = argparse.ArgumentParser(
        prog="esreid",
        description="Person and vehicle re-identification with ES-Net "
                    "(Erasing Salient Parts to Learn More in Re-Identification).",
    )
    parser.add_argument("--version", action="version", version=f"esreid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a preset or YAML config")
    _add_config_args(p, required=False, config_help=(
        "a preset name (see `esreid presets`) or a path to a YAML file; with --resume auto it "
        "only locates the run folder (the run's own config.yaml is resumed)"))
    p.add_argument("--resume", metavar="auto|RUN_DIR|CHECKPOINT",
                   help="continue a run from its config.yaml and newest checkpoint (last.pt, or "
                        "prev.pt if last.pt is damaged); --set then changes only what it names")
    p.add_argument("--overwrite", action="store_true",
                   help="clear an existing run folder of the same name and start again")
    p.add_argument("--force", action="store_true",
                   help="with --resume: allow --set to change the experiment (model, data, "
                        "erasing, loss, schedule); the change is recorded in metrics.jsonl")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the config's dataset")
    _add_config_args(p, required=False, config_help="a preset or YAML file (default: the config "
                     "stored in the checkpoint)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `esreid train`")
    p.add_argument("--out", help="results JSON to write (default: results_<dataset>[_rerank].json "
                                 "in the checkpoint's run folder, or beside the checkpoint)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sweep", help="train one run per value of a config key (e.g. Fig. 4's R)")
    _add_config_args(p)
    p.add_argument("--param", required=True, help="the key to sweep, e.g. erase.ratio")
    p.add_argument("--values", required=True, nargs="+", help="values, e.g. 0 0.1 0.2 0.3 0.4")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing run folders of the sweep")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("synth", help="write the embedded synthetic benchmark (Market-1501 layout)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--ids", type=int, default=300, help="number of identities (default 300)")
    p.add_argument("--cams", type=int, default=6, help="number of cameras (default 6)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--occlude-queries", nargs="?", const="all", metavar="PARTS",
                   help="the occluded-query variant: every query image gets one body part, "
                        "drawn at random per query, covered by a patch; PARTS is 'all' (the "
                        "default) or a comma-separated list among head, upper, lower, shoes. "
                        "Training and gallery images are the ordinary benchmark's")
    p.add_argument("--dominant-cue", metavar="PART",
                   help="the dominant-cue variant: every identity's PART (head, upper, lower, "
                        "shoes) has a colour and pattern no other identity has, the other parts "
                        "come from small palettes (docs/synthetic.md)")
    p.add_argument("--change-queries", metavar="PART",
                   help="every query's PART re-drawn in far-away colours (from the query's own "
                        "random stream); every other file is byte-identical")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("demo", help="train Base and ES-Net on the synthetic benchmark (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("study", help="models x seeds on the synthetic benchmark, evaluated on "
                                     "several query sets (designs: occlusion, mechanism)")
    p.add_argument("--design", default="occlusion", choices=["occlusion", "mechanism"],
                   help="occlusion (default): Base, ESB, ES-Net on normal and occluded queries; "
                        "mechanism: a dominant but unreliable cue, Base, ES-Net and two "
                        "controls on normal, changed-upper and occluded-upper queries")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study); "
                   "run again to resume an interrupted study, finished runs are kept")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="the design's models (or presets) to run (default: all of the "
                        "design's; occlusion: base esb esnet; mechanism: base esnet "
                        "esnet_randmap esnet_gap); differences are taken to base")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="training seeds, one run per model and seed (default: 0 1 2)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="change the study's settings for every run, "
                   "e.g. --set optim.epochs=12 model.backbone=resnet18")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("plot", help="draw a run's loss, lr, over-erasing diagnostic, P-pooling l "
                                    "and metrics to PNG files")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="Markdown table comparing runs (with the paper's rows)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's published rows")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("explain", help="CG-RAM heat maps of queries and their top gallery matches")
    _add_config_args(p, required=False, config_help="a preset or YAML file (default: the config "
                     "stored in the checkpoint)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `esreid train`")
    p.add_argument("--queries", type=int, default=4, help="number of queries (default 4)")
    p.add_argument("--top-k", type=int, default=3, help="gallery matches per query (default 3)")
    p.add_argument("--out", help="output folder (default: explanations/ in the checkpoint's run "
                                 "folder, or beside the checkpoint)")
    p.set_defaults(func=_cmd_explain)

    add_gallery_parsers(sub)

    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``esreid`` console script; returns the exit code."""
    from esreid.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"esreid {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, OSError, ValueError, RuntimeError, ArithmeticError, ImportError) as err:
        # Bad input gets one clear line, not a traceback; ESREID_DEBUG=1 shows the traceback.
        if os.environ.get("ESREID_DEBUG"):
            raise
        print(f"esreid {args.command}: error: {err}", file=sys.stderr)
        print("(set ESREID_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
