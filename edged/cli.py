"""The `edged` command: run the daemon, query it, manage the local model store.

Errors become exit codes in `edged.exits`: 0 ok, 1 runtime error, 2 bad usage
or configuration.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Only what is quick to import up here: `edged run` catches signals before numpy, pydantic
# (the config) and the runtimes are imported (main), so those are imported where used.
from edged import __version__, strict_json
from edged.errors import EdgedError
from edged.shutdown import Signals

if TYPE_CHECKING:
    from edged.config import Settings

ANNOTATED_FORMATS = (".jpg", ".jpeg", ".png")  # what `predict --annotate` writes
ANNOTATE_MAX_SIDE = 8192  # a larger input is drawn scaled down


def _settings(args: argparse.Namespace) -> Settings:
    """The settings as the command needs them: whole for `run`, its own sections for clients."""
    from edged.config import load_settings

    overrides: dict = {}
    if getattr(args, "socket", None):
        overrides["socket"] = {"path": args.socket}
    if getattr(args, "store", None):
        overrides["store"] = {"path": args.store}
    return load_settings(args.config, for_daemon=args.command == "run", **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from edged import systemd
    from edged.daemon import Daemon, configure_logging

    signals = getattr(args, "signals", None)  # caught from the first moment (main)
    if signals is None and not args.check:
        signals = Signals.install()
    settings = _settings(args)
    configure_logging(settings.logging.level)
    if args.check:
        return _check(settings)
    # Every thread's stack on stderr when a runtime crashes, or when the watchdog's SIGABRT
    # ends a daemon whose inference hung: the journal then shows where.
    faulthandler.enable()
    listener = systemd.listen_socket()  # socket activation; None: the daemon binds the socket itself
    daemon = Daemon(settings, listener, reload_settings=lambda: _settings(args))
    if listener is not None and daemon.server.path != settings.socket.path:
        logging.getLogger("edged").warning("serving on %s, the socket systemd passed; [socket] path %s "
                                           "is not used", daemon.server.path, settings.socket.path)
    print(f"edged {__version__}: serving the models in {settings.store.path} on {daemon.server.path}"
          + (" (socket from systemd)" if listener else ""), file=sys.stderr, flush=True)
    code = daemon.run(signals)
    if daemon.loading_abandoned:  # a runtime still compiling: exiting normally could wait for it
        daemon.signals.exit_now(code, "exiting while a model is still loading")
    return code


def _check(settings: Settings) -> int:
    from edged.api.routes import Api
    from edged.api.server import resolve_group
    from edged.models.manager import ModelManager
    from edged.models.store import ModelStore

    store = ModelStore(settings.store.path)
    manager = ModelManager(store, settings)
    Api(manager, settings)  # resolves users and groups
    resolve_group(settings.socket.group)
    manager.load_all()
    for name, info in sorted(manager.status().items()):
        where = f"{info['backend']}/{info['device']}" if "backend" in info else ""
        detail = info.get("error") or f"{info['version']} on {where} ({info['reason']})"
        print(f"{name}: {info['state']}: {detail}")
    manager.close()
    return 1 if manager.failures else 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from edged.client import Client
    from edged.config import ConfigError

    settings = _settings(args)
    path = Path(args.input)
    if args.annotate is not None:
        if path.suffix == ".npy":
            raise ConfigError("--annotate draws on a picture: --input must be an image, not a .npy tensor")
        if Path(args.annotate).suffix.lower() not in ANNOTATED_FORMATS:
            raise ConfigError(f"--annotate {args.annotate}: name a {', '.join(ANNOTATED_FORMATS)} file")
    with Client(settings.socket.path) as client:
        meta = client.metadata(args.model, args.version)
        if path.suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise EdgedError(f"{path}: not a readable .npy file: {exc}") from None
            inputs = {meta["inputs"][0]["name"]: array}
        else:
            return _predict_image(client, args, meta, path)
        doc, outputs = client.infer_full(args.model, inputs, version=args.version, binary=not args.json)
    if args.json:
        print(strict_json.dumps(doc))
        return 0
    print(f"{doc['model_name']} {doc['model_version']}")
    for name, array in outputs.items():
        summary = f"min {array.min():.6g} max {array.max():.6g} mean {array.mean():.6g}" if array.size else ""
        print(f"  {name} {array.dtype} {list(array.shape)} {summary}")
    return 0


def _predict_image(client, args: argparse.Namespace, meta: dict, path: Path) -> int:
    """An image goes through the model's preprocessing and, when it has one, its decoder."""
    from edged.api.tensors import DATATYPES
    from edged.pipelines.annotate import Seen
    from edged.pipelines.decoders import build_decoder
    from edged.pipelines.preprocess import image_to_tensor, read_image

    image = read_image(path)
    spec = meta["inputs"][0]
    params = meta.get("parameters") or {}
    tensor, placement = image_to_tensor(image, spec["shape"], DATATYPES[spec["datatype"]],
                                        params.get("preprocessing"))
    doc, outputs = client.infer_full(args.model, {spec["name"]: tensor}, version=args.version)
    decoder = build_decoder(params.get("decoder"), params.get("labels"))
    if decoder is None:
        result = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.ravel().tolist()}
                  for name, a in outputs.items()}
    else:
        result = decoder.decode(outputs, placement, image.shape[1], image.shape[0])
    if args.annotate is not None:
        if decoder is None:
            raise EdgedError(f"--annotate: model {args.model!r} has no decoder, so nothing to draw")
        _write_annotated(Path(args.annotate), image, result, Seen(image, outputs, placement, decoder))
    if args.json:
        print(strict_json.dumps({"model": doc["model_name"], "version": doc["model_version"], **result}))
        return 0
    print(f"{doc['model_name']} {doc['model_version']}")
    for detection in result.get("detections", []):
        box = ", ".join(f"{v:.3f}" for v in detection["box"])
        print(f"  score {detection['score']:.3f}  box [{box}]")
    if decoder is None:
        for name, array in outputs.items():
            print(f"  {name} {array.dtype} {list(array.shape)}")
    for key, value in result.items():
        if key != "detections" and decoder is not None:
            print(f"  {key}: {strict_json.dumps(value)}")
    return 0


def _write_annotated(path: Path, image, result: dict, seen) -> None:
    """The picture with what the decoder found drawn on it, at its own size, written atomically."""
    import cv2

    from edged.fsio import atomic_write
    from edged.pipelines.annotate import annotate

    drawn = annotate(result, seen, max_side=min(max(image.shape[:2]), ANNOTATE_MAX_SIDE))
    ok, data = cv2.imencode(path.suffix.lower(), drawn)
    if not ok:
        raise EdgedError(f"{path}: OpenCV could not encode the picture")
    atomic_write(path, data.tobytes())


def cmd_status(args: argparse.Namespace) -> int:
    from edged.client import Client

    settings = _settings(args)
    with Client(settings.socket.path) as client:
        status = client.status()
    if args.json:
        print(strict_json.dumps(status, indent=2))
        return 0
    print_status(status)
    return 0


def describe_candidates(probes: dict[str, dict]) -> str:
    """Each candidate tried at load: its probe time and start cost, or why it failed."""
    parts = []
    for label, probe in probes.items():
        cost = f", {probe['load_ms']:g} ms to load" if "load_ms" in probe else ""
        if "error" in probe:
            parts.append(f"{label} {'skipped' if probe.get('skipped') else 'failed'}: {probe['error']}")
        else:
            runs_on = f" (runs on {probe['runs_on']})" if "runs_on" in probe else ""
            parts.append(f"{label}{runs_on} {probe['p50_ms']:g} ms{cost}")
    return "; ".join(parts)


def print_status(status: dict) -> None:
    """The health document as a few readable tables."""
    print(f"edged {status['version']}  up {status['uptime_s']:.0f} s  ready: {status['ready']}")
    print("models:")
    for name, info in sorted(status["models"].items()):
        if info["state"] != "ready":
            print(f"  {name:20} {info['state']:8} {info.get('error', '')}")
            continue
        latency = "/".join("-" if v is None else f"{v:g}" for v in
                           (info["latency"][k] for k in ("p50_ms", "p95_ms", "p99_ms")))
        where = f"{info['backend']}/{info.get('device', 'CPU')}"
        print(f"  {name:20} {info['version']:8} {where:14} {info['precision']:5} "
              f"req {info['requests']:<8} err {info['errors']:<4} "
              f"p50/p95/p99 {latency} ms  ({info['reason']})")
        if len(info.get("probes") or {}) > 1:
            print(f"  {'':20} candidates: {describe_candidates(info['probes'])}")
    pipelines = status.get("pipelines") or {}
    if pipelines:
        print("pipelines:")
    for name, p in sorted(pipelines.items()):
        print(f"  {name:20} {p['state']:12} {p.get('processed_fps', 0):>6} fps  dropped {p['dropped']:<6} "
              f"errors {p['errors']:<4} {p.get('degraded_reason') or p.get('last_error', '')}")
    system = status.get("system") or {}
    mib = 1 << 20
    temps = ", ".join(f"{zone} {c} °C" for zone, c in (system.get("temperatures_c") or {}).items())
    print(f"system: cpu {system.get('cpu_percent')} %  "
          f"rss {(system.get('memory_rss_bytes') or 0) // mib} MiB  "
          f"available {(system.get('memory_available_bytes') or 0) // mib} MiB  "
          f"store free {(system.get('store_free_bytes') or 0) // mib} MiB" + (f"  {temps}" if temps else ""))
    mqtt = status.get("mqtt") or {}
    if not mqtt.get("enabled"):
        print("mqtt: off")
        return
    outbox = mqtt.get("outbox") or {}
    dropped = sum((outbox.get("dropped") or {}).values())
    print(f"mqtt: {'connected to' if mqtt['connected'] else 'NOT connected to'} {mqtt['broker']}  "
          f"reconnects {mqtt['reconnects']}  outbox {outbox.get('backlog', 0)} waiting, {dropped} dropped"
          + (f"  last error: {mqtt['last_error']}" if mqtt.get("last_error") else ""))


def cmd_pipelines(args: argparse.Namespace) -> int:
    from edged.client import Client

    settings = _settings(args)
    with Client(settings.socket.path) as client:
        if args.action in ("start", "stop", "restart"):
            client.pipeline_control(args.name, args.action)
            print(f"pipeline {args.name}: {args.action} done")
            return 0
        pipelines = client.pipelines()
    if args.json:
        print(strict_json.dumps(pipelines, indent=2))
        return 0
    if not pipelines:
        print("(no pipelines configured)")
    for name, p in pipelines.items():
        if args.action == "list" or "latency" not in p:
            detail = p.get("last_error", "") if args.action == "status" else ""
            print(f"{name:16} {p['state']:12} {p['model']:12} {p['source']}  {detail}".rstrip())
            continue
        p50 = p["latency"]["infer"]["p50_ms"]
        reason = p.get("degraded_reason") or p.get("last_error") or ""
        print(f"{name:16} {p['state']:12} {p['model']:12} source {p['source_fps']:6.1f} fps  "
              f"processed {p['processed_fps']:6.1f} fps  dropped {p['dropped']:<6} "
              f"infer p50 {'-' if p50 is None else f'{p50:g}'} ms  {reason}")
    return 0


def _list_models(store) -> int:
    """Every model, one line each; a model whose pointer is unreadable is named, not a stop."""
    unreadable = 0
    for name in store.names():
        versions = store.versions(name)
        try:
            active = store.active(name)
        except EdgedError as exc:
            print(f"{name}: {', '.join(versions) or '(no versions)'}  (active version unknown: {exc})")
            unreadable += 1
            continue
        listed = ", ".join(f"{v}*" if v == active else v for v in versions)
        print(f"{name}: {listed or '(no versions)'}")
    if not store.names():
        print(f"(no models in {store.root})")
    return 1 if unreadable else 0


def cmd_models(args: argparse.Namespace) -> int:
    from edged.models.store import ModelStore

    store = ModelStore(_settings(args).store.path)
    if args.action == "list":
        return _list_models(store)
    elif args.action == "add":
        labels = Path(args.labels).read_text().splitlines() if args.labels else None
        preprocessing = json.loads(Path(args.preprocess).read_text()) if args.preprocess else None
        decoder = json.loads(Path(args.decoder).read_text()) if args.decoder else None
        manifest = store.add(args.name, [Path(f) for f in args.files], args.version,
                             labels=labels, preprocessing=preprocessing, decoder=decoder)
        activate = args.activate or store.active(args.name) is None
        if activate:
            store.activate(args.name, args.version)
        print(f"added {manifest.name} {manifest.version} ({manifest.format})"
              + (", active" if activate else ""))
    elif args.action == "activate":
        store.activate(args.name, args.version)
        print(f"{args.name}: {args.version} is active")
    elif args.action == "rollback":
        print(f"{args.name}: rolled back to {store.rollback(args.name)}")
    elif args.action == "remove":
        store.remove(args.name, args.version)
        print(f"removed {args.name} {args.version or '(all versions)'}")
    elif args.action == "retry":
        from edged.models.attempts import Attempts

        count = Attempts(store, lambda _: None).forget(args.name)
        print(f"{args.name}: {count} crash record{'' if count == 1 else 's'} deleted; every backend is "
              "tried at its next load (restart edged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge inference daemon.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, socket: bool = False, store: bool = False) -> None:
        p.add_argument("--config", type=Path, help="TOML config (default /etc/edged/edged.toml if present)")
        if socket:
            p.add_argument("--socket", help="API socket path")
        if store:
            p.add_argument("--store", help="model store directory")

    run = sub.add_parser("run", help="run the daemon")
    common(run, socket=True, store=True)
    run.add_argument("--check", action="store_true", help="validate config and models, then exit")
    run.set_defaults(func=cmd_run)

    predict = sub.add_parser("predict", help="run one inference through the socket")
    common(predict, socket=True)
    predict.add_argument("--model", required=True)
    predict.add_argument("--version", dest="version", default=None, help="model version (default: active)")
    predict.add_argument("--input", required=True, help=".npy tensor, or a .jpg/.png image")
    predict.add_argument("--json", action="store_true", help="print the full JSON response")
    predict.add_argument("--annotate", metavar="OUT", default=None,
                         help="also write the picture with what the decoder found drawn on it "
                              "(.jpg or .png; boxes, keypoints, masks, top labels)")
    predict.set_defaults(func=cmd_predict)

    status = sub.add_parser("status", help="show the daemon's models and counters")
    common(status, socket=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    pipelines = sub.add_parser("pipelines", help="show and control the running pipelines")
    pipe_actions = pipelines.add_subparsers(dest="action", required=True)
    for action, helptext in (("list", "list the configured pipelines"),
                             ("status", "state, fps, drops and stage latencies")):
        p = pipe_actions.add_parser(action, help=helptext)
        common(p, socket=True)
        p.add_argument("--json", action="store_true")
    for action in ("start", "stop", "restart"):
        p = pipe_actions.add_parser(action, help=f"{action} a pipeline")
        common(p, socket=True)
        p.add_argument("name")
    pipelines.set_defaults(func=cmd_pipelines)

    models = sub.add_parser("models", help="manage the local model store")
    actions = models.add_subparsers(dest="action", required=True)
    common(actions.add_parser("list", help="list models and versions (* = active)"), store=True)
    add = actions.add_parser("add", help="add a version from model files")
    common(add, store=True)
    add.add_argument("name")
    add.add_argument("files", nargs="+")
    add.add_argument("--version", dest="version", required=True)
    add.add_argument("--labels", help="text file, one label per line")
    add.add_argument("--preprocess", help="JSON file with preprocessing settings")
    add.add_argument("--decoder", help="JSON file naming the output decoder, e.g. {\"type\": \"blazeface\"}")
    add.add_argument("--activate", action="store_true", help="activate it (default: only if none is)")
    for action, helptext in (("activate", "make a version active"), ("rollback", "go back one version"),
                             ("remove", "remove a version, or the whole model"),
                             ("retry", "forget that a backend crashed the daemon loading it")):
        p = actions.add_parser(action, help=helptext)
        common(p, store=True)
        p.add_argument("name")
        if action in ("activate", "remove"):
            p.add_argument("version", nargs="?" if action == "remove" else None)
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_run and not args.check:
        # SIGTERM, SIGINT and SIGHUP are caught from here, before the imports that take most
        # of a start's first half second (numpy, pydantic, the runtimes): a stop asked while
        # they load is seen (edged.shutdown). Only the interpreter's own start comes before.
        args.signals = Signals.install()
    from edged.exits import run_command

    return run_command("edged", args.func, args)
