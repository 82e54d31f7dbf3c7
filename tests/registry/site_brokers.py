"""Two real Mosquitto brokers bridged as docs/fleet.md says: a central one (where the
registry runs) and a site one (where devices connect) whose bridge carries `edged/...` to
the central one. Both take their ACLs and the bridge its configuration verbatim from the
"Site brokers" section of docs/fleet.md, so the test proves the documented files; only the
address, the bridge's password and its CA file (the test's central broker speaks plain TCP
on loopback) are the test's own.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.broker import HOST, Broker

FLEET_MD = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"
SITE = "site-berlin"  # the site's bridge account in the docs
BRIDGE_TOPIC = f"edged/sites/{SITE}/bridge"


def doc_block(header: str) -> str:
    """The fenced block of docs/fleet.md whose first line is `header` (without that line)."""
    for block in re.findall(r"^```\n(.*?)^```", FLEET_MD.read_text(), re.S | re.M):
        first, _, rest = block.partition("\n")
        if first.strip() == header:
            return rest
    raise AssertionError(f"docs/fleet.md has no block starting with {header!r}")


def users_of(acl: str) -> list[str]:
    return re.findall(r"^user (\S+)$", acl, re.M)


@dataclass
class SiteBrokers:
    central: Broker
    site: Broker

    def password(self, broker: Broker, user: str) -> str:
        return broker.users[user]

    def password_file(self, broker: Broker, user: str, directory: Path) -> Path:
        """A file holding `user`'s password on `broker`, as edged's `password_file` reads it."""
        path = directory / f"{user}-password"
        path.write_text(broker.users[user] + "\n")
        path.chmod(0o600)
        return path


def bridge_config(central: Broker, password: str) -> str:
    """The documented bridge.conf pointed at `central`."""
    text = doc_block("# site broker: /etc/mosquitto/conf.d/bridge.conf")
    lines = []
    for line in text.splitlines():
        key = line.split(" ", 1)[0]
        if key == "address":
            line = f"address {HOST}:{central.port}"
        elif key == "remote_password":
            line = f"remote_password {password}"
        elif key == "bridge_cafile":  # the test's central broker is plain TCP
            continue
        elif key == "restart_timeout":  # reconnect soon should the first attempt fail
            line = "restart_timeout 1 2"
        lines.append(line)
    return "\n".join(lines) + "\n"


def start_site_brokers(start_broker: Callable[..., Broker], devices: list[str]) -> SiteBrokers:
    """Central broker (documented ACL, a password per documented user), then the site broker
    (documented ACL, one account per device, the documented bridge) and wait until the bridge
    says it is connected on its notification topic at the central broker."""
    central_acl = doc_block("# central broker: /etc/mosquitto/acl")
    site_acl = doc_block("# site broker: /etc/mosquitto/acl")
    central = start_broker("password", acl={}, acl_text=central_acl,
                           users={user: secrets.token_urlsafe(12) for user in users_of(central_acl)})
    assert SITE in central.users, users_of(central_acl)
    site = start_broker("password", acl={}, acl_text=site_acl,
                        users={device: secrets.token_urlsafe(12) for device in devices},
                        extra_config=bridge_config(central, central.users[SITE]))
    return SiteBrokers(central, site)
