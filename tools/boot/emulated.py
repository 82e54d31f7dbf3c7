"""An arm64 Debian bookworm chroot under QEMU user emulation, for tools/arm64.py.

The rootfs is a zstd tarball under /var/cache/edged-arm64/, keyed by a hash of its package
list; each `chroot()` unpacks a fresh copy and deletes it afterwards. Inside, /proc, /sys and
/dev are bind-mounted (OpenVINO reads /sys), the host's CA certificates too (pip), and an
ARM /proc/cpuinfo text over the host's x86 one: under qemu-user the kernel's text is the
host's, and LiteRT's XNNPACK crashes at start on x86 text. Every mount is undone in a
`finally`, and processes left in the chroot are killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path("/var/cache/edged-arm64")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# tools/build_deb.sh's needs (python3.11, dpkg-dev for dpkg-shlibdeps and dpkg-deb,
# gcc/pkg-config/python3-dev/libsystemd-dev for systemd-python, binutils for strip and
# readelf) plus some of what edged's .deb depends on (smoke's apt-get install fetches the rest).
PACKAGES = ["python3", "python3-venv", "python3-dev", "gcc", "pkg-config", "libsystemd-dev",
            "dpkg-dev", "binutils", "ca-certificates", "adduser", "procps"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A Raspberry Pi 4 style Cortex-A72 (what `cat /proc/cpuinfo` shows on aarch64 Linux).
CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
CPUINFO = "\n".join(CPU.format(n=n) for n in range(4))


HOST_PACKAGES = ["qemu-user-static", "binfmt-support", "debootstrap", "zstd"]
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def missing_packages(packages: list[str]) -> list[str]:
    return [p for p in packages if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout
        != "install ok installed"]


def ensure_emulation() -> None:
    """Install QEMU's user emulator and register it for aarch64 ELF files, where missing.

    Idempotent; needs root. binfmt_misc is mounted where the machine did not mount it (a
    container's PID 1 that is not systemd does not), and the handler is registered with
    update-binfmts, whose qemu-aarch64 entry has the F flag: the kernel opens the emulator
    once, so it runs inside a chroot that does not have it.
    """
    if missing := missing_packages(HOST_PACKAGES):
        print(f"arm64: installing {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, stdout=subprocess.DEVNULL,
                       env={"PATH": PATH, "DEBIAN_FRONTEND": "noninteractive"})
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    if "enabled" not in (BINFMT / "qemu-aarch64").read_text():
        sys.exit("arm64: binfmt_misc has a qemu-aarch64 entry, but it is disabled")


def step(name: str, started: float) -> None:
    print(f"arm64: {name}: {time.monotonic() - started:.1f} s", flush=True)


def tar(root: Path, *args: str) -> None:
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=*", *args],
                   check=True)


def rootfs_tarball() -> Path:
    """The cached arm64 rootfs, built with debootstrap --foreign + second stage when missing."""
    packages = sorted(set(PACKAGES))
    key = hashlib.sha256(f"{SUITE} arm64 {MIRROR} {' '.join(packages)}".encode()).hexdigest()[:12]
    tarball = CACHE / f"{SUITE}-arm64-{key}.tar.zst"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="rootfs.", dir=CACHE))
    root = build / "root"
    try:
        subprocess.run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
                        f"--include={','.join(packages)}", SUITE, str(root), MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"],
                       check=True, stdout=subprocess.DEVNULL, env={"PATH": PATH, "LANG": "C.UTF-8"})
        subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True, env={"PATH": PATH})
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
        partial = tarball.with_suffix(".partial")
        tar(root, "-I", "zstd -T0 -3", "-cf", str(partial), ".")
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return tarball


def mounts_below(root: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines
            if line.split()[4] == str(root) or line.split()[4].startswith(f"{root}/")]


@contextlib.contextmanager
def chroot(tarball: Path):
    """A fresh copy of the rootfs with /proc, /sys, /dev, CA certs and an ARM cpuinfo mounted."""
    work = Path(tempfile.mkdtemp(prefix="chroot.", dir=CACHE))
    root = work / "root"
    try:
        root.mkdir()
        tar(root, "-I", "zstd -T0", "-xf", str(tarball))
        (work / "cpuinfo").write_text(CPUINFO)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        for source, target, extra in [("/proc", "proc", ["--rbind"]), ("/sys", "sys", ["--rbind"]),
                                      ("/dev", "dev", ["--rbind"]),
                                      (str(work / "cpuinfo"), "proc/cpuinfo", ["--bind"]),
                                      ("/etc/ssl/certs", "etc/ssl/certs", ["--bind", "-o", "ro"])]:
            if not (root / target).exists():
                (root / target).mkdir(parents=True)
            subprocess.run(["mount", *extra, source, str(root / target)], check=True)
            if extra[0] == "--rbind":  # unmounting below never propagates back to the host
                subprocess.run(["mount", "--make-rslave", str(root / target)], check=True)
        yield root
    finally:
        # Kill what is still running in the chroot (only processes whose root is ours).
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if Path(proc / "root").resolve() == root:
                    subprocess.run(["kill", "-9", proc.name], check=False)
        for mount in sorted(mounts_below(root), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        if mounts_below(root):
            print(f"arm64: mounts left below {root}; not deleting it", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(root: Path, command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive",
           "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", command], env=env, check=check,
                          **kwargs)
