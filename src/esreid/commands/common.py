"""Helpers shared by several commands: model arguments, loading a model, the lock wait."""

from __future__ import annotations

import argparse
import sys


def model_args(p: argparse.ArgumentParser, required: bool) -> None:
    """--checkpoint | --onnx, --set and --device: the model a command embeds with."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", help="checkpoint written by `esreid train`")
    group.add_argument("--onnx", help="model written by `esreid export` (embeds with onnxruntime)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override the checkpoint's config, e.g. eval.batch_size=32")
    p.add_argument("--device", default="cpu", help="torch device for --checkpoint (default cpu)")


def wait_arg(p: argparse.ArgumentParser) -> None:
    """--wait: how long a writer waits for the index lock."""
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for another process writing the same index "
                        "(default 300; 0 refuses at once)")


def load_reid_model(checkpoint: str | None, onnx: str | None, overrides: list[str], device: str):
    """A ReIDModel from a checkpoint (with --set overrides) or an ONNX file."""
    from esreid.inference import ReIDModel

    if onnx:
        if overrides:
            from esreid.config import ConfigError

            raise ConfigError("--set applies to --checkpoint models; an ONNX model's settings "
                              "are fixed at export")
        return ReIDModel.from_onnx(onnx)
    return ReIDModel.from_checkpoint(checkpoint, device=device, overrides=overrides)


def say(line: str) -> None:
    """A progress line on stderr (e.g. while waiting for a lock)."""
    print(f"esreid: {line}", file=sys.stderr, flush=True)
