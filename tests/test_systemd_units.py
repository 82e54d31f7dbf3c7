"""The units in systemd/ as systemd 252 reads them.

`systemd-analyze verify` exits 0 even when it ignores a setting it cannot parse, so a
unit passes only when it prints nothing. It also checks that every Exec*= program
exists, so the units are verified in a scratch root (`--root`): the host's units (for
sysinit.target, network-online.target, ...), ours where the package puts them, and the
programs they run at their absolute paths (edged's real entry points from this venv).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ["edged.service", "edged.socket", "edged-registry.service"]
HOST_UNITS = Path("/lib/systemd/system")
MAX_EXPOSURE = 1.5


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def programs(unit: Path) -> set[str]:
    """The absolute programs of the unit's Exec*= lines, without systemd's prefixes (-@:+!)."""
    found = set()
    for key, values in parse_unit(unit).get("Service", {}).items():
        if key.startswith("Exec"):
            found.update(value.split()[0].lstrip("-@:+!") for value in values)
    return found


def make_root(base: Path, units: dict[str, Path]) -> Path:
    """A root that holds the host's units, the given ones, and the programs they run."""
    root = base / "root"
    shutil.copytree(HOST_UNITS, root / "lib/systemd/system", symlinks=True)
    for name, unit in units.items():
        shutil.copyfile(unit, root / "lib/systemd/system" / name)
        for program in programs(unit):
            assert program.startswith("/"), f"{name}: {program} is not an absolute path"
            if program.startswith("/opt/edged/bin/"):
                source = Path(sys.executable).parent / Path(program).name
            else:
                source = Path(program).resolve()
            target = root / program.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("units"), {name: UNIT_DIR / name for name in UNITS})


def test_units_verify_without_a_word(unit_root):
    result = analyze("verify", f"--root={unit_root}", *UNITS)
    assert (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr
    assert result.returncode == 0


def test_verify_would_catch_a_bad_setting(tmp_path):
    # The check above is only worth something if a mistake shows: a misspelt key and
    # an unparsable value are ignored by systemd (exit 0) but printed.
    text = (UNIT_DIR / "edged.service").read_text()
    text = text.replace("ProtectSystem=strict", "ProtectSystem=strickt\nProtectKernelTunable=yes")
    broken = tmp_path / "edged.service"
    broken.write_text(text)
    root = make_root(tmp_path, {"edged.service": broken, "edged.socket": UNIT_DIR / "edged.socket"})
    result = analyze("verify", f"--root={root}", "edged.service")
    output = result.stdout + result.stderr
    assert "ProtectKernelTunable" in output and "strickt" in output


@pytest.mark.parametrize("unit", ["edged.service", "edged-registry.service"])
def test_exposure_is_low(unit_root, unit):
    result = analyze("security", "--offline=yes", f"--root={unit_root}", unit)
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_socket_outlives_the_service():
    # The socket's directory must not be the service's RuntimeDirectory=, which systemd
    # deletes when the service stops (and the socket file in it); and the daemon must
    # be told the path the socket unit listens on.
    socket = parse_unit(UNIT_DIR / "edged.socket")["Socket"]
    service = parse_unit(UNIT_DIR / "edged.service")
    path = Path(socket["ListenStream"][0])
    assert path == Path("/run/edged/edged.sock")
    assert (socket["SocketMode"], socket["SocketGroup"]) == (["0660"], ["edged"])
    runtime = service["Service"].get("RuntimeDirectory", [])
    preserved = service["Service"].get("RuntimeDirectoryPreserve", ["no"]) == ["yes"]
    for directory in " ".join(runtime).split():
        assert preserved or Path("/run", directory) not in (path.parent, *path.parent.parents)
    assert f"EDGED_SOCKET__PATH={path}" in service["Service"]["Environment"]
    assert service["Unit"]["Requires"] == ["edged.socket"]
    assert service["Service"]["Type"] == ["notify"]


# The drop-ins docs/accelerators.md gives for accelerators: each read with the unit as
# systemd reads /etc/systemd/system/edged.service.d/.
DROP_INS = sorted((UNIT_DIR / "accelerators").glob("*.conf"))


@pytest.mark.parametrize("drop_in", DROP_INS, ids=lambda path: path.stem)
def test_accelerator_drop_ins_verify_and_keep_the_exposure(drop_in, tmp_path):
    root = make_root(tmp_path, {name: UNIT_DIR / name for name in UNITS})
    directory = root / "lib/systemd/system/edged.service.d"
    directory.mkdir()
    shutil.copyfile(drop_in, directory / drop_in.name)
    result = analyze("verify", f"--root={root}", "edged.service")
    assert (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr
    security = analyze("security", "--offline=yes", f"--root={root}", "edged.service")
    [device_class] = parse_unit(drop_in)["Service"]["DeviceAllow"]
    acl = next(line for line in security.stdout.splitlines() if "device ACL" in line)
    assert device_class.replace(" ", ":") in acl and "char-video4linux:rw" in acl, acl  # added, not replaced
    match = re.search(r"Overall exposure level for edged.service: (\d+\.\d)", security.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, security.stdout


def test_accelerator_drop_ins_are_the_ones_documented():
    text = (ROOT / "docs" / "accelerators.md").read_text()
    assert DROP_INS, "systemd/accelerators/ holds the drop-ins"
    for drop_in in DROP_INS:
        assert drop_in.read_text() in text, f"docs/accelerators.md shows {drop_in.name} as it is"
