#!/usr/bin/env python3
"""Build and try edged's arm64 .deb in a Debian bookworm arm64 chroot under QEMU user emulation.

A standalone first step of issue 11's arm64 part; no test or CI uses it yet. Run as root:
    tools/arm64.py rootfs    # build (or find) the cached arm64 rootfs tarball
    tools/arm64.py build     # tools/build_deb.sh inside it -> dist/edged_<version>_arm64.deb
    tools/arm64.py smoke     # install that .deb into a fresh rootfs; --version, run, predict

Needs debootstrap, zstd and qemu-user-static registered in binfmt_misc (F flag):
`apt-get install qemu-user-static binfmt-support debootstrap zstd`; where binfmt_misc is not
mounted: `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable
qemu-aarch64`. `smoke` also needs the sample model (tools/fetch_models.py) and the repo's
.venv (cv2, scikit-image) to write the astronaut face picture.

The rootfs is a zstd tarball under /var/cache/edged-arm64/, keyed by a hash of its package
list; each command unpacks a fresh copy and deletes it afterwards. Inside, /proc, /sys and
/dev are bind-mounted (OpenVINO reads /sys), the host's CA certificates too (pip), and an
ARM /proc/cpuinfo text over the host's x86 one (LiteRT's XNNPACK crashes on x86 text).
Every mount is undone in a `finally`.

Status: all three commands work (measured on an x86 host, 2026-12-03): `rootfs` cold
~8.3 min (debootstrap --foreign + emulated second stage; tarball 150 MiB), warm 0 s plus
~10 s to unpack and mount; `build` ~9.1 min inside the chroot (DEB_COMPRESSION=gzip; the
emulated readelf loop and dpkg-deb's gzip take ~4 of them), .deb 96 MiB; `smoke` ~2.5 min:
apt-get install 73 s, --version 3 s, then for OpenVINO and LiteRT: `edged run`, the first
predict once the model is loaded (20 s / 10 s after start), two more predicts (~5 s each,
mostly the CLI's emulated start); the daemon's p50 per inference is ~1.26 s (OpenVINO) and
~0.84 s (LiteRT), one face at score 0.921 on both (MediaPipe's reference: 0.922).
Not done: `tools/build_deb.sh --arch arm64`, any test or CI use, checks beyond printing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def cmd_rootfs(_args: argparse.Namespace) -> Path:
    started = time.monotonic()
    tarball = rootfs_tarball()
    step(f"rootfs {tarball.name} ({tarball.stat().st_size >> 20} MiB)", started)
    return tarball


def cmd_build(args: argparse.Namespace) -> Path:
    tarball = cmd_rootfs(args)
    started = time.monotonic()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dist = ROOT / "dist"
    with chroot(tarball) as root:
        step("unpack and mount", started)
        src = root / "src/edged"
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        started = time.monotonic()
        result = run(root, "cd /src/edged && DEB_COMPRESSION=gzip tools/build_deb.sh /src/dist",
                     stdout=subprocess.PIPE, text=True)
        built = root / result.stdout.strip().splitlines()[-1].lstrip("/")
        dist.mkdir(exist_ok=True)
        deb = dist / built.name
        shutil.copy2(built, deb)
        step(f"build {deb.relative_to(ROOT)} ({deb.stat().st_size >> 20} MiB)", started)
    return deb


def daemon_predict(root: Path, backend: str) -> None:
    """`edged run` with [models.face] on this backend, then `edged predict` on the picture twice."""
    (root / "smoke/edged.toml").write_text(
        f'[socket]\npath = "/smoke/edged.sock"\n[store]\npath = "/smoke/store"\n'
        f'[models.face]\nbackend = "{backend}"\n')
    (root / "smoke/edged.sock").unlink(missing_ok=True)
    started = time.monotonic()
    log = open(root / f"smoke/run-{backend}.log", "wb")  # closed below
    argv = ["chroot", str(root), "/opt/edged/bin/edged", "run", "--config", "/smoke/edged.toml"]
    daemon = subprocess.Popen(argv,
                              env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"},
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not (root / "smoke/edged.sock").exists():
            if daemon.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(f"edged run ({backend}) did not start: "
                                   f"{(root / f'smoke/run-{backend}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        step(f"edged run ({backend}) listening", started)
        predict = ("/opt/edged/bin/edged predict --config /smoke/edged.toml --model face "
                   "--input /smoke/astronaut.png")
        while "still loading" in (out := run(root, predict, check=False, capture_output=True, text=True)
                                  ).stderr and time.monotonic() - started < 300:
            time.sleep(1)
        print(out.stdout + out.stderr, end="")
        step(f"edged run ({backend}) model loaded, first predict", started)
        for attempt in (1, 2):
            started = time.monotonic()
            run(root, "/opt/edged/bin/edged predict --config /smoke/edged.toml --model face "
                      "--input /smoke/astronaut.png")
            step(f"edged predict ({backend}) #{attempt} incl. CLI start", started)
        run(root, "/opt/edged/bin/edged status --config /smoke/edged.toml", check=False)
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def cmd_smoke(args: argparse.Namespace) -> None:
    debs = sorted((ROOT / "dist").glob("edged_*_arm64.deb"))
    model = Path.home() / ".cache/edged/samples/face_detection_short_range.tflite"
    if not debs or not model.exists():
        sys.exit("arm64: needs dist/edged_*_arm64.deb (tools/arm64.py build) and the sample "
                 f"model {model} (tools/fetch_models.py)")
    tarball = cmd_rootfs(args)
    started = time.monotonic()
    with chroot(tarball) as root:
        smoke = root / "smoke"
        smoke.mkdir()
        shutil.copy2(debs[-1], smoke / debs[-1].name)
        shutil.copy2(model, smoke / "face.tflite")
        pin = json.loads((ROOT / "models/samples.json").read_text())["models"]["face"]
        (smoke / "preprocess.json").write_text(json.dumps(pin["preprocessing"]))
        (smoke / "decoder.json").write_text(json.dumps(pin["decoder"]))
        # The face picture the tests compare with MediaPipe (skimage's astronaut), made on the host.
        subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                        "import sys, cv2, skimage.data; cv2.imwrite(sys.argv[1], "
                        "cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))",
                        str(smoke / "astronaut.png")], check=True)
        run(root, f"apt-get update -qq && apt-get install -y -qq /smoke/{debs[-1].name}",
            stdout=subprocess.DEVNULL)
        step(f"install {debs[-1].name}", started)
        started = time.monotonic()
        run(root, "/opt/edged/bin/edged --version")
        step("edged --version", started)
        started = time.monotonic()
        run(root, "/opt/edged/bin/edged models add face /smoke/face.tflite --version 1 --activate "
                  "--preprocess /smoke/preprocess.json --decoder /smoke/decoder.json --store /smoke/store")
        step("edged models add face", started)
        for backend in ("openvino", "litert"):
            daemon_predict(root, backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["rootfs", "build", "smoke"])
    args = parser.parse_args()
    {"rootfs": cmd_rootfs, "build": cmd_build, "smoke": cmd_smoke}[args.command](args)


if __name__ == "__main__":
    main()
