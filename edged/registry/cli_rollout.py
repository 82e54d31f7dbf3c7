"""`edged-registry rollout ...`: its arguments and what it prints (the changes themselves:
rollout_commands.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from edged.errors import InvalidInput
from edged.registry.publisher import Publisher
from edged.registry.rollout_commands import (
    change_rollout,
    format_status,
    load_rollouts,
    start_rollout,
    status_dict,
)
from edged.registry.rollout_plan import parse_waves
from edged.registry.store import RegistryStore

ROLLOUT_ACTIONS = ("status", "pause", "resume", "abort")


def cmd_rollout(args: argparse.Namespace) -> int:
    """`rollout NAME VERSION [options]` records one; `rollout status [NAME]`, `pause NAME`,
    `resume NAME`, `abort NAME` act on one (no model may be called like an action)."""
    settings = args.load_settings(args)
    publisher = Publisher(settings, RegistryStore(settings.root))
    first, second = args.name, args.version
    if first == "status":
        found = load_rollouts(publisher, second)
        if args.json:
            print(json.dumps([status_dict(r) for r in found], indent=2))
        else:
            print("\n".join(format_status(r) for r in found) if found else "(no rollouts)")
        return 0
    if first in ROLLOUT_ACTIONS:
        if second is None:
            args.parser.error(f"rollout {first} needs the model's name")
        if args.force and first != "abort":
            args.parser.error("--force goes with abort only")
        rollout, notes = change_rollout(publisher, second, first, force=args.force)
        for note in notes:
            print(f"note: {note}")
        print(json.dumps(status_dict(rollout), indent=2) if args.json else format_status(rollout))
        return 0
    if second is None:
        args.parser.error("rollout needs NAME VERSION (or status, pause, resume, abort)")
    rollout = start_rollout(
        publisher, first, second, args.waves, group=args.group,
        soak_s=settings.rollout_soak_s if args.soak_s is None else args.soak_s,
        max_failures=settings.rollout_max_failures if args.max_failures is None else args.max_failures,
        report_timeout_s=settings.rollout_report_timeout_s if args.report_timeout_s is None
        else args.report_timeout_s)
    if args.json:
        print(json.dumps(status_dict(rollout), indent=2))
    else:
        waves = ", ".join(w.spec for w in rollout.waves)
        print(f"recorded rollout {rollout.name} {rollout.version} in waves {waves}; `edged-registry serve` "
              "drives it (`edged-registry rollout status` follows it)")
    return 0


def _duration(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 7 * 86_400:  # also refuses nan
        raise argparse.ArgumentTypeError("must be between 0 and 604800 seconds")
    return value


def _waves(text: str) -> str:
    try:
        parse_waves(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be from 0 to 1000000")
    return value


def add_rollout_parser(sub: Any, parents: list[argparse.ArgumentParser],
                       load_settings: Callable[[argparse.Namespace], Any]) -> None:
    """`load_settings(args)`: the CLI's settings and logging set-up."""
    rollout = sub.add_parser(
        "rollout", parents=parents, help="a staged rollout in waves with health gates",
        description="rollout NAME VERSION [options] starts one; rollout status [NAME] | pause NAME | "
                    "resume NAME | abort NAME [--force] acts on one.")
    rollout.add_argument("name", help="the model, or status, pause, resume, abort")
    rollout.add_argument("version", nargs="?", help="the version (or, after an action, the model)")
    rollout.add_argument("--group", help="roll out to this group's devices only (default: all devices)")
    rollout.add_argument("--waves", default="1%,10%,50%,100%", type=_waves,
                         help="percentages of the eligible devices (1%%,10%%,50%%,100%%, the default) "
                              "or group names in order (canary,site-a,site-b)")
    rollout.add_argument("--soak-s", type=_duration, help="seconds a settled wave runs before the next "
                                                          "(default: rollout_soak_s)")
    rollout.add_argument("--max-failures", type=_count,
                         help="more failed or silent devices halt the rollout "
                              "(default: rollout_max_failures)")
    rollout.add_argument("--report-timeout-s", type=_duration,
                         help="a device that reports nothing for this long is silent "
                              "(default: rollout_report_timeout_s)")
    rollout.add_argument("--force", action="store_true",
                         help="with abort: end it now; devices not back keep their rollback releases")
    rollout.add_argument("--json", action="store_true")
    rollout.set_defaults(func=cmd_rollout, parser=rollout, load_settings=load_settings)
