"""A Debian rootfs (debootstrap, cached as a zstd tarball) booted under systemd-nspawn.

The host's PID 1 is not systemd, so nspawn runs with --keep-unit --register=no and
commands reach the container through nsenter into its PID 1's namespaces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# Always in the base image: systemd as PID 1 and what the checks themselves use.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "curl", "ca-certificates"]
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message: str) -> None:
    print(f"boot_test: {message}", file=sys.stderr, flush=True)


def depends_of(deb: Path) -> list[str]:
    """The package names in the .deb's Depends (the first of each alternative)."""
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], check=True,
                           capture_output=True, text=True).stdout
    names = []
    for item in field.split(","):
        name = item.split("|")[0].split("(")[0].strip()
        if name:
            names.append(name)
    return names


def rootfs_tarball(cache: Path, packages: list[str], arch: str) -> tuple[Path, bool]:
    """The cached base rootfs for these packages, built when missing. Returns (path, built)."""
    packages = sorted(set(packages) | set(BASE_PACKAGES))
    key = hashlib.sha256(f"{SUITE} {arch} {MIRROR} {' '.join(packages)}".encode()).hexdigest()[:12]
    tarball = cache / f"{SUITE}-{arch}-{key}.tar.zst"
    if tarball.exists():
        return tarball, False
    cache.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="rootfs.", dir=cache))
    try:
        log(f"building the rootfs ({len(packages)} packages) -> {tarball}")
        subprocess.run(["debootstrap", "--variant=minbase", f"--arch={arch}",
                        f"--include={','.join(packages)}", SUITE, str(build / "root"), MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
        root = build / "root"
        subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)
        (root / "etc/hostname").write_text("edged-boot\n")
        # A fixed machine id: no first-boot logic; every container is thrown away anyway.
        (root / "etc/machine-id").write_text(hashlib.md5(key.encode()).hexdigest() + "\n")  # noqa: S324
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "-I", "zstd -T0 -3", "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return tarball, True


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _is_ns_init(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return line.split()[-1] == "1" and len(line.split()) > 2
    except OSError:
        pass
    return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """An nspawn container booted from a fresh copy of the tarball."""

    def __init__(self, tarball: Path, workdir: Path, name: str = "edged-boot") -> None:
        self.tarball = tarball
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None

    def unpack(self) -> None:
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "-I", "zstd -T0", "-xf", str(self.tarball)], check=True)

    def boot(self, timeout: float = 60) -> None:
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--boot", f"--directory={self.root}", f"--machine={self.name}",
                 "--keep-unit", "--register=no", "--system-call-filter=bpf", "--console=read-only",
                 "--resolv-conf=copy-host", "--timezone=off"],
                env=env, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: see {self.console}")
            # nspawn's child is the container's PID 1 (its NSpid ends in 1).
            for pid in _children(self.proc.pid):
                if _is_ns_init(pid) and _comm(pid) == "systemd":  # exec'd, inside the rootfs
                    self.pid1 = pid
                    return
            time.sleep(0.1)
        raise RuntimeError("no container PID 1 found")

    def run(self, command: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        """A shell command inside the container, as root; stdout and stderr merged."""
        if self.pid1 is None:
            raise RuntimeError("container not running")
        argv = ["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i", f"PATH={INNER_PATH}",
                "LANG=C.UTF-8", "HOME=/root", "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=",
                "/bin/sh", "-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        result.stdout = (result.stdout + result.stderr).strip()
        if check and result.returncode:
            raise RuntimeError(f"`{command}` exited {result.returncode}: {result.stdout[-500:]}")
        return result

    def out(self, command: str, timeout: float = 120) -> str:
        return self.run(command, timeout=timeout).stdout

    def stop(self, timeout: float = 60) -> str:
        """Power off cleanly; kill only when that fails. Returns how it ended."""
        if self.proc is None or self.proc.poll() is not None:
            return "not running"
        how = "poweroff"
        try:
            self.run("systemctl poweroff --no-block", timeout=20)
        except (subprocess.SubprocessError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            how = "killed (poweroff timed out)"
            for pid in (self.proc.pid, self.pid1):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.proc.wait(10)
        return f"{how}, nspawn exit {self.proc.returncode}"

    def cleanup(self) -> None:
        """Stop if still running, then delete the rootfs (after any mount left below it)."""
        try:
            self.stop()
        finally:
            root = str(self.root)
            mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                      if line.split()[4].startswith(root)]
            for mount in sorted(mounts, reverse=True):
                subprocess.run(["umount", "-l", mount], check=False)
            shutil.rmtree(self.root, ignore_errors=True)
