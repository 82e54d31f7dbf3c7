"""The .deb, built once per session by tools/build_deb.sh, as an admin meets it:
lintian finds no error in it; `dpkg -i` installs it on this machine; the installed
`edged` reports its version and, run as the service's user, validates a config and
loads real models; installing it again (an upgrade, to the maintainer scripts) keeps the
units enabled; `dpkg -r` disables them, deletes a dead socket file and its lock left in
/run/edged, and keeps config and models; `dpkg --purge` deletes them. Installing after a
remove enables the units again; an admin's disable survives upgrades and reinstalls.

No systemd runs here, so what the scripts ask of a running systemd (stop on remove, on an
upgrade a restart of edged.service alone with edged.socket left listening, start on a first
install) is checked by the boot test under a real systemd, not here.

Building takes two and a half to four minutes on two busy cores (most of it xz
compressing 400 MB). The test changes this machine:
it needs root, and leaves behind only the system users edged and edged-registry,
which purge keeps by design. State an earlier edged left in /etc/edged,
/var/lib/edged or /var/cache/edged is moved aside for the test and put back.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import edged
from tests.conftest import ir_files, to_toml

ROOT = Path(__file__).resolve().parent.parent
EDGED = "/opt/edged/bin/edged"
STATE = [Path("/etc/edged"), Path("/var/lib/edged"), Path("/var/cache/edged")]
ENABLED = [Path("/etc/systemd/system/sockets.target.wants/edged.socket"),
           Path("/etc/systemd/system/multi-user.target.wants/edged.service")]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a .deb: needs root"),
    pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg (Debian or Ubuntu)"),
]


def run(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env["DEB_COMPRESSION"] = "gzip"  # the same package, built in a fraction of xz's time
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def ok(*args: str, **kwargs) -> str:
    result = run(*args, **kwargs)
    command = " ".join(args)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def installed() -> bool:
    result = run("dpkg-query", "-W", "-f=${db:Status-Status}", "edged")
    return result.returncode == 0 and result.stdout != "not-installed"


@pytest.fixture(scope="session")
def deb(built_deb: Path) -> Path:
    assert built_deb.name == f"edged_{edged.__version__}_{ok('dpkg', '--print-architecture').strip()}.deb"
    return built_deb


@pytest.fixture
def this_machine() -> Iterator[None]:
    """The machine to install on, one test run at a time, given back as it was found."""
    with open("/run/lock/edged-test-package.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            pytest.fail("the edged package (or its configuration) is on this machine; "
                        "the test would replace it: purge it first")
        saved = {}
        for path in STATE:
            if path.exists():
                aside = path.with_name(f"{path.name}.saved-by-test-package")
                assert not aside.exists(), f"{aside} is left from an earlier run: put it back first"
                path.rename(aside)
                saved[path] = aside
        try:
            yield
        finally:
            if installed():
                run("dpkg", "--purge", "edged")
            for path, aside in saved.items():
                shutil.rmtree(path, ignore_errors=True)
                aside.rename(path)


def leave_dead_socket() -> list[Path]:
    """A real Unix socket file at the service's path, closed, and its lock file beside it."""
    path = Path("/run/edged/edged.sock")
    path.parent.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    lock = path.with_name(path.name + ".lock")
    lock.write_text("edged pid 1\n")
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # dead, as the boot test found it
    return [path, lock]


def test_lintian_finds_no_error(deb):
    result = run("lintian", "--tag-display-limit", "0", str(deb))
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [] and result.returncode == 0, result.stdout + result.stderr


def test_openvinos_gpu_and_npu_plugins_ship_and_opencl_is_only_recommended(deb):
    """An Intel iGPU or NPU needs OpenVINO's plugins in the package; the GPU plugin's OpenCL
    library is for machines that have one, so it must not be a hard dependency."""
    control = run("dpkg-deb", "--field", str(deb)).stdout
    fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line)
    assert fields["Recommends"] == "ocl-icd-libopencl1"
    assert "opencl" not in fields["Depends"].lower()
    files = run("dpkg-deb", "--contents", str(deb)).stdout
    for plugin in ("libopenvino_intel_gpu_plugin.so", "libopenvino_intel_npu_plugin.so"):
        assert f"/openvino/libs/{plugin}" in files, plugin


def test_install_check_remove_purge(deb, this_machine, sample_models, tiny_ir):
    ok("dpkg", "-i", str(deb))
    assert ok(EDGED, "--version").strip() == f"edged {edged.__version__}"
    assert ok("/usr/bin/edged-registry", "--version").strip() == f"edged-registry {edged.__version__}"
    assert Path("/etc/edged/edged.toml").read_text() == (ROOT / "packaging" / "edged.toml").read_text()
    assert all(link.is_symlink() for link in ENABLED), "edged.socket and edged.service are enabled"
    groups = ok("id", "-nG", "edged").split()
    assert "edged" in groups and ("video" in groups or run("getent", "group", "video").returncode != 0)
    # The installed units, against the installed programs: not a word from verify.
    verify = run("systemd-analyze", "verify", "edged.service", "edged.socket", "edged-registry.service")
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # A store with a .tflite and an OpenVINO IR, filled with the installed CLI, and
    # `run --check` as the user the service runs as: the venv works for it, both runtimes load.
    work = Path(tempfile.mkdtemp(prefix="edged-deb-", dir="/tmp"))
    try:
        work.chmod(0o755)
        store = work / "store"
        add = [EDGED, "models", "add", "--store", str(store), "--version", "1"]
        ok(*add, "face", str(sample_models["face"]))
        ok(*add, "tiny", *map(str, ir_files(tiny_ir)))
        cache = work / "cache"
        cache.mkdir()
        shutil.chown(cache, "edged", "edged")
        config = work / "edged.toml"
        config.write_text(to_toml({"store": {"path": str(store)},
                                   "backends": {"openvino_cache_dir": str(cache), "probe_runs": 3}}))
        config.chmod(0o644)
        ok("chmod", "-R", "a+rX", str(store))
        check = ok("runuser", "-u", "edged", "--", EDGED, "run", "--check", "--config", str(config), cwd=work)
        lines = check.splitlines()
        assert [line.split(":")[0] for line in lines] == ["face", "tiny"], check
        assert all(": ready: 1 on " in line for line in lines), check
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # What the service would have made: models in its state directory, an admin's file in /etc/edged.
    model = Path("/var/lib/edged/models/face/1/model.tflite")
    model.parent.mkdir(parents=True)
    model.write_bytes(sample_models["face"].read_bytes())
    Path("/etc/edged/mqtt-password").write_text("secret\n")

    # Installing again over itself is an upgrade to postinst (it gets the old version):
    # the units stay enabled, and a unit the admin disabled stays disabled.
    ok("dpkg", "-i", str(deb))
    assert all(link.is_symlink() for link in ENABLED), "an upgrade keeps edged enabled"

    # What a stopped socket unit and daemon leave in /run/edged: a socket file nobody
    # listens on (connections refused) and the daemon's instance lock.
    dead = leave_dead_socket()
    ok("dpkg", "-r", "edged")
    assert not Path("/opt/edged").exists() and not Path("/usr/bin/edged").exists()
    for path in dead:
        assert not path.exists(), f"{path} is left after remove"
    for link in ENABLED:
        assert not link.exists() and not link.is_symlink(), f"{link} is left after remove (disable)"
    assert Path("/etc/edged/edged.toml").exists() and Path("/etc/edged/mqtt-password").exists()
    assert model.read_bytes() == sample_models["face"].read_bytes()

    ok("dpkg", "--purge", "edged")
    assert not installed()
    for path in [*STATE, *ENABLED]:
        assert not path.exists() and not path.is_symlink(), f"{path} is left after purge"
    assert not list(Path("/etc/systemd/system").rglob("edged*")), "unit links left after purge"


def test_enabled_again_after_remove_and_reinstall_an_admins_disable_kept(deb, this_machine):
    ok("dpkg", "-i", str(deb))
    ok("dpkg", "-r", "edged")
    assert not any(link.is_symlink() for link in ENABLED)
    ok("dpkg", "-i", str(deb))  # remove, then install again: enabled as on a first install
    assert all(link.is_symlink() for link in ENABLED), "enabled again after remove and install"

    ok("systemctl", "disable", "edged.socket", "edged.service")  # the admin's choice
    assert not any(link.is_symlink() for link in ENABLED)
    ok("dpkg", "-i", str(deb))  # an upgrade keeps it
    assert not any(link.is_symlink() for link in ENABLED), "an upgrade enabled what the admin disabled"
    ok("dpkg", "-r", "edged")
    ok("dpkg", "-i", str(deb))  # and so does a remove and install
    assert not any(link.is_symlink() for link in ENABLED), "a reinstall enabled what the admin disabled"
    ok("dpkg", "--purge", "edged")
    assert not list(Path("/etc/systemd/system").rglob("edged*")), "unit links left after purge"
