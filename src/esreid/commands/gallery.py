"""The gallery commands: export, index build|add|info, search, serve."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from esreid.commands.common import load_reid_model, model_args, say, wait_arg


def _cmd_export(args: argparse.Namespace) -> int:
    from esreid.export import export_onnx
    from esreid.inference import ReIDModel

    model = ReIDModel.from_checkpoint(args.checkpoint, overrides=args.overrides)
    out = export_onnx(model, Path(os.path.expandvars(args.out)).expanduser(), opset=args.opset)
    print(f"wrote {out}: input images [N, 3, {model.height}, {model.width}] -> descriptors "
          f"[N, {model.descriptor_dim}] ({'flip-averaged, ' if model.flip else ''}{model.metric} "
          f"distance; model {model.identity})")
    return 0



def _index_threshold(args: argparse.Namespace, metric: str):
    from esreid.config import ConfigError
    from esreid.search import threshold_from_results

    if args.threshold is not None and args.threshold_from:
        raise ConfigError("give --threshold or --threshold-from, not both")
    if args.threshold_from:
        return threshold_from_results(args.threshold_from, args.fpr, metric)
    if args.threshold is not None:
        return args.threshold, {"given": args.threshold}
    return None, None


def _report_failed(failed) -> None:
    for path, reason in failed:
        # The image reader's reasons already start with "cannot read image <path>: ".
        prefix = f"cannot read image {path}: "
        print(f"skipped {path}: {reason.removeprefix(prefix)}", file=sys.stderr)


def _files(n: int) -> str:
    return f"{n} file{'' if n == 1 else 's'}"


def _refuse_existing_index(out: Path, overwrite: bool) -> None:
    """Like training's run folders: an existing index is never replaced silently."""
    from esreid.config import ConfigError
    from esreid.search import GalleryIndex, IndexFileError

    if overwrite or not (out.exists() or out.is_symlink()):
        return
    try:
        what = f"{GalleryIndex.read_metadata(out)['count']} images"
    except (IndexFileError, OSError, KeyError):
        what = "not a readable gallery index"
    raise ConfigError(f"index {out} already exists ({what}): add images to it with `esreid "
                      f"index add {out} --images DIR`, write another with --out NEW, or "
                      "replace it with --overwrite")


def _backend_settings(args: argparse.Namespace, out: Path) -> dict:
    """The backend settings the build options give (only those given), checked against
    the kind: an option another kind takes is refused naming both."""
    from esreid.config import ConfigError
    from esreid.search import backend_class

    given = {"nlist": args.nlist, "nprobe": args.nprobe, "store": args.store,
             "collection": args.collection}
    params = backend_class(args.kind).params
    for name, value in given.items():
        if value is not None and name not in params:
            raise ConfigError(f"--{name} does not apply to --kind {args.kind} (it takes "
                              f"{', '.join('--' + k for k in params if k in given) or 'none'})")
    settings = {k: v for k, v in given.items() if v is not None and k in params}
    if "collection" in params and "collection" not in settings:
        # One collection per index file by default: its name, made safe for Qdrant.
        settings["collection"] = "".join(c if c.isalnum() or c in "-_" else "_"
                                         for c in out.stem) or "esreid"
    if "store" in params and "store" not in settings:
        raise ConfigError(f"--kind {args.kind} needs --store: a folder (local mode) or the "
                          "URL of a Qdrant server (API key from $QDRANT_API_KEY)")
    return settings


def _cmd_index_build(args: argparse.Namespace) -> int:
    from esreid.engine import distributed
    from esreid.search import build_index
    from esreid.search.shards import rank_and_world

    out = Path(os.path.expandvars(args.out)).expanduser().absolute()
    _refuse_existing_index(out, args.overwrite)  # before the slow part
    settings = _backend_settings(args, out)
    model = load_reid_model(args.checkpoint, args.onnx, args.overrides, _rank_device(args))
    threshold, source = _index_threshold(args, model.metric)
    rank, world = rank_and_world()
    if world > 1 or args.shard_size is not None:
        try:
            return _build_sharded(args, out, model, threshold, source, settings)
        finally:
            distributed.cleanup()
    index, failed = build_index(model, args.images, labels_csv=args.labels, kind=args.kind,
                                threshold=threshold, threshold_source=source,
                                replace=args.overwrite, **settings)
    _save_built(args, out, index, failed)
    return 0


def _rank_device(args: argparse.Namespace) -> str:
    """Under torchrun, each process embeds on its own GPU (LOCAL_RANK) when --device cuda."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and args.device == "cuda":
        return f"cuda:{local}"
    return args.device


def _build_sharded(args: argparse.Namespace, out: Path, model, threshold, source,
                   settings: dict) -> int:
    """Every process embeds its shards into <out>.shards/; rank 0 then builds the index
    from them, in order, and removes the folder."""
    import shutil

    from esreid.engine import distributed
    from esreid.search.shards import (
        DEFAULT_SHARD_SIZE,
        build_index_from_shards,
        embed_shards,
        plan,
        rank_and_world,
    )

    rank, world = rank_and_world()
    ctx = distributed.setup("cpu") if world > 1 else None
    shards = out.with_name(out.name + ".shards")
    p = plan(model, args.images, args.labels, args.shard_size or DEFAULT_SHARD_SIZE)
    run = embed_shards(model, p, shards)
    _say_run(run, rank, world)
    if ctx is not None:
        distributed.barrier(ctx)
    if rank != 0:
        return 0
    index, failed = build_index_from_shards(model, shards, args.kind, threshold=threshold,
                                            threshold_source=source, replace=args.overwrite,
                                            **settings)
    _save_built(args, out, index, p.skipped + failed)
    shutil.rmtree(shards, ignore_errors=True)
    return 0


def _say_run(run, rank: int, world: int) -> None:
    rate = run.images / run.seconds if run.seconds > 0 and run.images else 0.0
    say(f"process {rank} of {world}: embedded {len(run.embedded)} shard(s), {run.images} "
        f"images ({rate:.1f} images/s), skipped {len(run.skipped)} already written")


def _save_built(args: argparse.Namespace, out: Path, index, failed) -> None:
    from esreid.search import index_lock

    index.model_path = str(Path(args.onnx or args.checkpoint).expanduser().resolve())
    with index_lock(out).acquire(timeout=args.wait, on_wait=say):
        # Another process may have written it while this one embedded.
        _refuse_existing_index(out, args.overwrite)
        index.save(out)
    _report_failed(failed)
    where = f" (qdrant collection {index.backend.collection!r} in {index.backend.store})" \
        if index.kind == "qdrant" else ""
    print(f"wrote {out}{where}: {index.count} images ({_files(len(failed))} skipped)")
    uploads = Path(f"{out}.uploads")
    if args.overwrite and uploads.is_dir():
        print(f"note: {uploads} still holds the images uploaded to the index this one replaced "
              "(not part of the new index; delete the folder if they are not needed)",
              file=sys.stderr)


def _cmd_embed(args: argparse.Namespace) -> int:
    from esreid.engine import distributed
    from esreid.search.shards import MANIFEST, embed_shards, plan, rank_and_world

    rank, world = rank_and_world()
    model = load_reid_model(args.checkpoint, args.onnx, args.overrides, _rank_device(args))
    ctx = distributed.setup("cpu") if world > 1 else None
    try:
        out = Path(os.path.expandvars(args.out)).expanduser().absolute()
        p = plan(model, args.images, args.labels, args.shard_size)
        run = embed_shards(model, p, out)
        _say_run(run, rank, world)
        if ctx is not None:
            distributed.barrier(ctx)
        if rank == 0:
            _report_failed(p.skipped)
            print(f"wrote {out}: {out / MANIFEST} and {p.shards} shard(s) of up to "
                  f"{p.shard_size} images ({len(p.images)} images)")
    finally:
        distributed.cleanup()
    return 0


def _cmd_index_migrate(args: argparse.Namespace) -> int:
    from esreid.search import GalleryIndex, index_lock
    from esreid.search.migrate import migrate

    old = Path(os.path.expandvars(args.index)).expanduser().absolute()
    out = Path(os.path.expandvars(args.out)).expanduser().absolute() if args.out else old
    if out != old:
        _refuse_existing_index(out, args.overwrite)
    source = GalleryIndex.load(old)
    settings = _backend_settings(args, out)
    with index_lock(old).acquire(timeout=args.wait, on_wait=say):
        if source.changed_on_disk():
            source = GalleryIndex.load(old)
        new = migrate(source, args.kind, out, replace=args.overwrite, **settings)
    print(f"migrated {old} ({source.kind}, {source.count} images) to {out} ({new.kind}"
          + (f": collection {new.backend.collection!r} in {new.backend.store}"
             if new.kind == "qdrant" else "") + "); search results checked equal")
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from esreid.search import GalleryIndex, add_to_index_file

    index = GalleryIndex.load(args.index)
    model = _index_model(index, args)
    saved, added, failed = add_to_index_file(index, model, args.images, labels_csv=args.labels,
                                             timeout=args.wait, on_wait=say)
    _report_failed(failed)
    print(f"{saved.source}: added {added} images ({_files(len(failed))} skipped), "
          f"{saved.count} in all")
    return 0


def _cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from esreid.search import GalleryIndex

    info = GalleryIndex.load(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:18s} {value}")
    return 0


def _index_model(index, args: argparse.Namespace):
    """The model to embed queries for ``index``: --checkpoint/--onnx, else the one that built
    it (recorded in the index)."""
    from esreid.config import ConfigError

    if args.checkpoint or args.onnx:
        model = load_reid_model(args.checkpoint, args.onnx, args.overrides, args.device)
    else:
        path = getattr(index, "model_path", None)
        if not path:
            raise ConfigError(f"{index.source} does not record its model: pass --checkpoint or --onnx")
        is_onnx = path.endswith(".onnx")
        model = load_reid_model(None if is_onnx else path, path if is_onnx else None,
                                 args.overrides, args.device)
    index.check_model(model.identity, f"queries embedded by {model.source}")
    return model


def _query_labels(args: argparse.Namespace, queries: list[str]) -> list[str | None]:
    """The label of each query from ``--labels`` (paths as written, or relative to the
    working directory), None where it names none."""
    if not args.labels:
        return [None] * len(queries)
    from esreid.search import labels_from_csv

    table = {os.path.normpath(os.path.abspath(os.path.expanduser(p))): label
             for p, label in labels_from_csv(args.labels).items()}
    return [table.get(os.path.normpath(os.path.abspath(q))) for q in queries]


def _search_filter(args: argparse.Namespace):
    from esreid.config import ConfigError
    from esreid.search import SearchFilter

    try:
        return SearchFilter.make(args.camera_not, args.after, args.before)
    except ValueError as err:
        raise ConfigError(f"--{str(err).replace('_', '-')}") from err


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from esreid.search import GalleryIndex

    index = GalleryIndex.load(args.index)
    model = _index_model(index, args)
    queries = [str(Path(os.path.expandvars(q)).expanduser()) for q in args.queries]
    query_labels = _query_labels(args, queries)
    features = model.embed(queries)
    flt = _search_filter(args)
    results = index.search(features, top_k=args.top_k, model_id=model.identity, filter=flt)
    if args.explain:
        from esreid.explain import save_rank_list

        out_dir = Path(os.path.expandvars(args.explain)).expanduser()
        for qi, (query, matches) in enumerate(zip(queries, results, strict=True)):
            label = query_labels[qi]
            panels = [(m.path, f"#{m.rank}  d={m.distance:.3f}" + (f"\n{m.label}" if m.label else ""),
                       None if label is None or m.label is None else m.label == label, m.same)
                      for m in matches]
            figure = save_rank_list(model, query, panels, out_dir / f"query{qi:02d}_{Path(query).stem}.png",
                                    title=Path(query).name + (f" ({label})" if label else ""),
                                    threshold=index.threshold)
            print(f"explanation: {figure}", file=sys.stderr)
    if args.json:
        print(json.dumps({"index": str(index.source), "model": model.identity,
                          "threshold": index.threshold, "filter": flt.to_dict(),
                          "results": [{"query": q, "matches": [m.to_dict() for m in ms]}
                                      for q, ms in zip(queries, results, strict=True)]}, indent=2))
        return 0
    for query, matches in zip(queries, results, strict=True):
        print(query)
        for m in matches:
            verdict = "" if m.same is None else ("  same" if m.same else "  different")
            label = f"  [{m.label}]" if m.label else ""
            print(f"  {m.rank:3d}  {m.distance:.4f}{verdict}  {m.path}{label}")
    return 0


def _listening_socket(host: str, port: int):
    """A socket bound to ``host``:``port`` (uvicorn listens on it), or OSError naming both:
    a busy port is reported before anything says the server is up."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: unknown host ({err.strerror})") from err
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart need not wait for the old connections' TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = (": another program is using the port (choose another with --port)"
                if err.errno == errno.EADDRINUSE else "")
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from err
    return sock


def _cmd_serve(args: argparse.Namespace) -> int:
    from esreid.export import require
    from esreid.serve import create_app

    uvicorn = require("uvicorn", "serve")
    sock = _listening_socket(args.host, args.port)
    try:
        model = None
        if args.checkpoint or args.onnx:
            model = load_reid_model(args.checkpoint, args.onnx, args.overrides, args.device)
        index = Path(os.path.expandvars(args.index)).expanduser()
        app = create_app(index, model=model, token=args.token or os.environ.get("ESREID_TOKEN"),
                         max_upload_bytes=int(args.max_upload_mb * 2**20))
        size = app.state.service.index.count
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {app.state.service.index.source} ({size} images) on "
              f"http://{shown}:{port}", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0



def _kind_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    from esreid.search import DEFAULT_KIND, backend_class, kinds

    lines = "; ".join(f"{k}: {backend_class(k).summary}" for k in kinds())
    p.add_argument("--kind", choices=kinds(), required=required,
                   default=None if required else DEFAULT_KIND,
                   help=f"search backend (default {DEFAULT_KIND}). {lines}")
    p.add_argument("--nlist", type=int, help="ivf: number of lists")
    p.add_argument("--nprobe", type=int, help="ivf: lists visited per query")
    p.add_argument("--store", metavar="PATH_OR_URL",
                   help="qdrant: a folder (embedded local mode, no server) or http(s)://HOST:6333 "
                        "of a Qdrant server or cluster, whose API key is read from $QDRANT_API_KEY")
    p.add_argument("--collection", help="qdrant: the collection (default: the index file's name)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera-not", nargs="+", action="extend", metavar="CAMERA",
                   help="leave out matches seen by these cameras (e.g. the query's own)")
    p.add_argument("--after", metavar="TIME", help="only matches captured at or after TIME "
                   "(ISO 8601, e.g. 2024-05-01T12:00:00Z, or seconds since the epoch); "
                   "matches without a capture time are left out")
    p.add_argument("--before", metavar="TIME", help="only matches captured at or before TIME")


def add_parsers(sub) -> None:
    """Register the gallery subcommands on ``sub`` (the ``esreid`` subparsers)."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX (descriptor model, dynamic batch)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `esreid train`")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override the checkpoint's config, e.g. eval.flip=false")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("index", help="build, extend or describe a gallery index for `esreid search`")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = index_sub.add_parser("build", help="embed every image under a folder into a new index")
    model_args(q, required=True)
    q.add_argument("--images", required=True, help="gallery folder (searched recursively)")
    q.add_argument("--out", required=True, help="index file to write")
    q.add_argument("--labels", help="CSV of path,label[,camera][,time] (default: identity = "
                                    "sub-folder name; camera from Market-style file names)")
    _kind_args(q)
    q.add_argument("--threshold", type=float, help="distance at or below which a match is "
                                                   "called the same identity")
    q.add_argument("--threshold-from", metavar="RUN_OR_RESULTS",
                   help="take the threshold from a run's evaluation (results JSON or run folder)")
    q.add_argument("--fpr", type=float, default=1e-3,
                   help="with --threshold-from: the false-positive rate to operate at (default 1e-3)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing index file (otherwise it is refused: extend it "
                        "with `esreid index add`, or write another with --out)")
    wait_arg(q)
    q.add_argument("--shard-size", type=int, metavar="N",
                   help="embed in shards of N images (rounded up to a multiple of the batch "
                        "size) under <out>.shards/, which a rerun resumes; the default under "
                        "torchrun (1024), where each process embeds its own shards")
    q.set_defaults(func=_cmd_index_build)
    q = index_sub.add_parser("add", help="embed the images of another folder into an index")
    q.add_argument("index", help="index file")
    q.add_argument("--images", required=True, help="folder of images to add")
    q.add_argument("--labels", help="CSV of path,label (default: identity = sub-folder name)")
    model_args(q, required=False)
    wait_arg(q)
    q.set_defaults(func=_cmd_index_add)
    q = index_sub.add_parser("info", help="summarise an index")
    q.add_argument("index", help="index file")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_index_info)
    q = index_sub.add_parser("migrate", help="move an index's gallery to another backend "
                                             "(e.g. --kind qdrant --store URL)")
    q.add_argument("index", help="index file to migrate")
    _kind_args(q, required=True)
    q.add_argument("--out", help="the new index file (default: replace INDEX itself, which "
                                 "then names the new backend)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or empty an existing collection")
    wait_arg(q)
    q.set_defaults(func=_cmd_index_migrate)

    p = sub.add_parser("embed", help="embed a folder into descriptor shards and a manifest "
                                     "(torchrun: one shard set per process)")
    model_args(p, required=True)
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="folder for manifest.json and shard-NNNNN.npz; "
                                                "a rerun skips the shards already there")
    p.add_argument("--labels", help="CSV of path,label[,camera][,time] (default: identity = "
                                    "sub-folder name)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N",
                   help="images per shard, rounded up to a multiple of the batch size "
                        "(default 1024)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("search", help="rank an index's gallery for query images")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    p.add_argument("--index", required=True, help="index built by `esreid index build`")
    p.add_argument("--top-k", type=int, default=10, help="matches per query (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--explain", metavar="OUT_DIR", help="also draw each query's rank list with "
                                                        "CG-RAM overlays into OUT_DIR")
    p.add_argument("--labels", metavar="CSV",
                   help="the queries' identity labels (CSV path,label, as for index build): "
                        "the --explain frames then show whether each match has the query's label")
    _filter_args(p)
    model_args(p, required=False)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("serve", help="serve a gallery index: JSON API and a search page")
    p.add_argument("--index", required=True, help="index built by `esreid index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", help="allow POST /api/gallery with Authorization: Bearer TOKEN "
                                   "(or set ESREID_TOKEN); without it the gallery is read-only")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest accepted upload in MiB (default 10)")
    model_args(p, required=False)
    p.set_defaults(func=_cmd_serve)
