"""`edged-registry`: keygen, publish, list, promote, retire, rollout, fleet, serve.

Errors become exit codes in `edged.exits`: 0 ok, 1 runtime error (including a change
stored but not announced), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edged import __version__
from edged.errors import InvalidInput
from edged.exits import run_command
from edged.registry.cli_rollout import add_rollout_parser
from edged.registry.config import RegistrySettings, load_registry_settings
from edged.registry.fleet_table import format_table, watch
from edged.registry.publisher import Outcome, Publisher, newer_elsewhere, release_version
from edged.registry.server import serve
from edged.registry.store import KEY_FILE, RegistryStore, Target
from edged.signing import key_id, public_key_text
from edged.systemd import configure_logging

log = logging.getLogger("edged.registry")


def _settings(args: argparse.Namespace) -> RegistrySettings:
    """The settings, and logging: `serve` at the configured level, commands quieter (their
    output is what they print) unless the level is debug."""
    settings = load_registry_settings(args.config)
    level = settings.log_level
    if args.command != "serve" and level != "debug":
        level = "warning"
    # The daemon's set-up: journal entries under systemd (no time of their own), else lines.
    configure_logging(level, "edged-registry")
    return settings


def _where(target: Target) -> str:
    return "all devices" if target.group is None else f"group {target.group}"


def cmd_keygen(args: argparse.Namespace) -> int:
    store = RegistryStore(_settings(args).root)
    key = store.create_key()
    public = public_key_text(key)
    print(f"signing key written to {store.root / KEY_FILE} (mode 0600); keep a copy offline")
    print(f"key id {key_id(key)}")
    print(f"public key {public}")
    print(f'pin it on every device: [updates] public_keys = ["{public}"]')
    return 0


def _read_json_file(path: str | None, what: str) -> dict | None:
    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise InvalidInput(f"{path}: {what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{path}: {what} must be a JSON object")
    return value


def cmd_publish(args: argparse.Namespace) -> int:
    settings = _settings(args)
    labels = Path(args.labels).read_text().splitlines() if args.labels else None
    outcome = Publisher(settings, RegistryStore(settings.root)).publish(
        args.name, [Path(f) for f in args.files], args.version, group=args.group, labels=labels,
        preprocessing=_read_json_file(args.preprocess, "preprocessing"),
        decoder=_read_json_file(args.decoder, "decoder"), description=args.description,
        selftest_input=Path(args.selftest) if args.selftest else None, atol=args.atol, rtol=args.rtol,
        hold=args.hold)
    if args.hold:
        print(f"stored {args.name} {args.version}; announced nowhere (`edged-registry rollout` or `promote` "
              "releases it)")
        return 0
    _report(outcome, "published", newer_elsewhere(outcome))
    return 0


def _report(outcome: Outcome, verb: str, newer: bool) -> None:
    target = outcome.target
    replaced = f", replacing {outcome.previous}" if outcome.previous and outcome.previous != outcome.version \
        else ""
    print(f"{verb} {target.name} {outcome.version} for {_where(target)}{replaced}")
    if newer:
        print(f"note: {_where(target)} had {outcome.previous}; devices already on it stay there "
              "unless told to roll back")


def cmd_promote(args: argparse.Namespace) -> int:
    settings = _settings(args)
    outcome = Publisher(settings, RegistryStore(settings.root)).promote(args.name, args.version, args.group)
    _report(outcome, "promoted", newer_elsewhere(outcome))
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    settings = _settings(args)
    withdrawn = Publisher(settings, RegistryStore(settings.root)).retire(args.name, args.version)
    where = ", ".join(_where(t) for t in withdrawn) or "nowhere (it was not retained)"
    print(f"retired {args.name} {args.version}: its files are no longer served; withdrawn from {where}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = RegistryStore(_settings(args).root)
    retained: dict[tuple[str, str], list[str | None]] = {}
    for target, envelope in store.retained().items():
        version = release_version(envelope) if envelope else None
        if version is not None and target.device is None:  # rollouts show their device releases
            retained.setdefault((target.name, version), []).append(target.group)
    listing = {}
    for name in store.names():
        versions = {}
        for version in store.versions(name):
            groups = retained.get((name, version), [])
            versions[version] = {"retired": store.is_retired(name, version),
                                 "all_devices": None in groups,
                                 "groups": sorted(g for g in groups if g is not None)}
        listing[name] = versions
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing:
        print(f"(no models in {store.root})")
    for name, versions in listing.items():
        print(name)
        for version, info in versions.items():
            where = (["all devices"] if info["all_devices"] else []) + [f"group {g}" for g in info["groups"]]
            state = "retired" if info["retired"] else (
                f"retained for {', '.join(where)}" if where else "stored, not retained")
            print(f"  {version}  {state}")
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    summary = watch(_settings(args), args.wait)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary, args.wait))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    serve(settings, RegistryStore(settings.root))
    return 0


def _tolerance(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1e6:  # also refuses nan
        raise argparse.ArgumentTypeError("must be a number from 0 to 1e6")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged-registry",
                                     description="Publish signed model releases to edged devices over MQTT.")
    parser.add_argument("--version", action="version", version=f"edged-registry {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path,
                        help="TOML config (default /etc/edged/registry.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", parents=[common], help="create the signing key (once)")
    keygen.set_defaults(func=cmd_keygen)

    publish = sub.add_parser("publish", parents=[common], help="store a version and announce its release")
    publish.add_argument("name")
    publish.add_argument("files", nargs="+", help="the model files (an IR: its .xml and .bin)")
    publish.add_argument("--version", dest="version", required=True)
    publish.add_argument("--group", help="announce to this group of devices only (default: all devices)")
    publish.add_argument("--labels", help="text file, one label per line")
    publish.add_argument("--preprocess", help="JSON file with preprocessing settings")
    publish.add_argument("--decoder", help='JSON file naming the output decoder, e.g. {"type": "blazeface"}')
    publish.add_argument("--description", default="", help="free text for people")
    publish.add_argument("--selftest", metavar="INPUT.npy",
                         help="an input for the model's first input; its outputs become the self-test")
    publish.add_argument("--atol", type=_tolerance, default=1e-3, help="self-test absolute tolerance")
    publish.add_argument("--rtol", type=_tolerance, default=1e-2, help="self-test relative tolerance")
    publish.add_argument("--hold", action="store_true",
                         help="store and sign it, announce it nowhere (for `rollout`)")
    publish.set_defaults(func=cmd_publish)

    listing = sub.add_parser("list", parents=[common], help="versions, and where each is retained")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    promote = sub.add_parser("promote", parents=[common], help="announce a stored version to a group")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--group", help="the group (default: all devices)")
    promote.set_defaults(func=cmd_promote)

    retire = sub.add_parser("retire", parents=[common], help="withdraw a version and stop serving it")
    retire.add_argument("name")
    retire.add_argument("version")
    retire.set_defaults(func=cmd_retire)

    add_rollout_parser(sub, [common], _settings)

    fleet = sub.add_parser("fleet", parents=[common], help="devices seen on the broker and their versions")
    fleet.add_argument("--wait", type=_seconds, default=3.0,
                       help="seconds to listen (health reports are not retained; default 3)")
    fleet.add_argument("--json", action="store_true")
    fleet.set_defaults(func=cmd_fleet)

    serve = sub.add_parser("serve", parents=[common], help="answer chunk requests; keep releases retained")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edged-registry", args.func, args)
