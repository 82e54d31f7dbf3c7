"""The .deb booted under a real systemd: tools/boot_test.py installs this tree's package in
a Debian bookworm container (systemd-nspawn, systemd as PID 1) and checks what
docs/service.md promises, one line per check (readiness and STATUS=, inference, socket
activation, the watchdog restarting a stopped daemon, journald fields, reload, a restart
that keeps the socket, a clean stop, exposure and privileges, sandbox writes, group-only
socket access, an upgrade that keeps the socket, remove, reinstall and purge). The lines
are printed as they come.

The base rootfs is cached outside the clone (/var/cache/edged-boot-test): about 90 s to
build once, 3 s to restore. Needs root with CAP_SYS_ADMIN, systemd-nspawn and debootstrap
(tools/setup.sh installs both); without them the test is skipped, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ("boot:", "install:", "units active:", "readiness and STATUS=:", "inference:",
            "socket activation:", "watchdog:", "journald fields:", "reload:", "restart keeps the socket:",
            "clean stop:", "systemd-analyze security:", "privileges of the main process:",
            "sandbox writes:", "group-only socket access:", "upgrade keeps the socket:", "apt remove:",
            "reinstall:", "apt purge:")


def _cannot_boot() -> str | None:
    """Why this machine cannot boot a container, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "zstd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tools/setup.sh installs it on Debian and Ubuntu)"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no CAP_SYS_ADMIN to make namespaces: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_cannot_boot() is not None, reason=str(_cannot_boot()))
def test_the_deb_boots_under_systemd_and_keeps_what_the_docs_promise(built_deb, sample_models, capsys):
    lines: list[str] = []
    with capsys.disabled():
        print("\nboot test (tools/boot_test.py):", flush=True)
        command = [sys.executable, str(ROOT / "tools" / "boot_test.py"), "--deb", str(built_deb)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith(("PASS", "FAIL", "NOT CHECKABLE", "wall ")):
                    print("  " + line, end="", flush=True)
            code = proc.wait(timeout=1800)
    output = "\n".join(lines)
    assert code == 0, f"the boot test failed:\n{output}"
    passed = [line for line in lines if line.startswith("PASS")]
    for check in EXPECTED:
        found = any(line.split(None, 1)[1].startswith(check) for line in passed)
        assert found, f"no PASS for {check}\n{output}"
