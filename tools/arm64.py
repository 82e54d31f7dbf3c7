#!/usr/bin/env python3
"""Build edged's arm64 .deb and smoke-test it under QEMU user emulation, against x86.

Run as root on an x86_64 Debian/Ubuntu machine:
    tools/arm64.py rootfs                 # build (or find) the cached arm64 rootfs tarball
    tools/arm64.py build [--outdir DIR]   # = tools/build_deb.sh --arch arm64
    tools/arm64.py smoke [--deb PATH]     # install into a fresh rootfs, compare with x86

`build` runs tools/build_deb.sh inside the arm64 rootfs (pip installs the aarch64 wheels,
systemd-python is compiled there) with dpkg-deb's compression off, and compresses the
package on the host (DEB_COMPRESSION, default xz, as build_deb.sh): compressing 96 MiB in
emulation costs minutes. `smoke` installs the .deb with apt-get into a fresh copy of the
rootfs, runs `edged --version`, then for OpenVINO and LiteRT `edged run` and
`edged predict` on a face picture, and does the same with this checkout's x86 .venv; it
exits 1 unless both architectures find the same faces (boxes within 1 px, scores within
0.01). It needs the sample model (tools/fetch_models.py) and the repo's .venv.

Everything it needs on the host (qemu-user-static, binfmt-support, debootstrap, zstd) is
installed when missing, and binfmt_misc is mounted and QEMU's aarch64 handler enabled
(tools/boot/emulated.py). tests/test_arm64.py runs `build` and `smoke` in .ci/run.

Measured on 2 shared x86 cores (2026-12-03): rootfs cold 4.8 min (tarball 150 MiB), warm
3 s to unpack; `build` 3.7 min in emulation plus the host's compression (xz 77 s, 61 MiB;
gzip a few seconds); `smoke` 2.4 min: apt-get install 50 s, `edged run` to the first
answer 20-30 s per backend; one emulated face inference 2.1-2.5 s (LiteRT, OpenVINO) and
the same face as x86 (score 0.9211, boxes identical) on both backends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from boot.emulated import CACHE, PATH, chroot, ensure_emulation, rootfs_tarball, run, step

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path.home() / ".cache/edged/samples/face_detection_short_range.tflite"
BOX_TOLERANCE_PX = 1.0
SCORE_TOLERANCE = 0.01
# The median of 5 socket round trips of the face model, in ms (the daemon's own latency
# histogram has coarse buckets; a CLI call is mostly its emulated start).
TIME_INFERENCE = """
import sys, time
import numpy as np
from edged.api.tensors import DATATYPES
from edged.client import Client
with Client(sys.argv[1]) as client:
    spec = client.metadata("face")["inputs"][0]
    tensor = np.zeros(spec["shape"], DATATYPES[spec["datatype"]])
    times = []
    for _ in range(5):
        started = time.perf_counter()
        client.infer_full("face", {spec["name"]: tensor})
        times.append(time.perf_counter() - started)
print(sorted(times)[2] * 1000)
"""


def cmd_rootfs(_args: argparse.Namespace) -> Path:
    started = time.monotonic()
    ensure_emulation()
    tarball = rootfs_tarball()
    step(f"rootfs {tarball.name} ({tarball.stat().st_size >> 20} MiB)", started)
    return tarball


def repack(built: Path, deb: Path) -> None:
    """The uncompressed .deb from the chroot, compressed natively (same files and modes)."""
    tree = Path(tempfile.mkdtemp(prefix="repack.", dir=CACHE))
    try:
        subprocess.run(["dpkg-deb", "--raw-extract", str(built), str(tree / "edged")], check=True)
        deb.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{os.environ.get('DEB_COMPRESSION', 'xz')}",
                        "--build", str(tree / "edged"), str(deb)], check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def cmd_build(args: argparse.Namespace) -> Path:
    tarball = cmd_rootfs(args)
    started = time.monotonic()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    with chroot(tarball) as root:
        step("unpack and mount", started)
        src = root / "src/edged"
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        started = time.monotonic()
        result = run(root, "cd /src/edged && DEB_COMPRESSION=none tools/build_deb.sh /src/dist",
                     stdout=subprocess.PIPE, text=True)
        built = root / result.stdout.strip().splitlines()[-1].lstrip("/")
        step("build_deb.sh in the arm64 rootfs", started)
        started = time.monotonic()
        deb = Path(args.outdir).resolve() / built.name
        repack(built, deb)
        step(f"compress on the host: {deb} ({deb.stat().st_size >> 20} MiB)", started)
    print(deb)
    return deb


@dataclass
class Target:
    """Where edged runs: the arm64 chroot (commands prefixed by chroot) or this machine."""

    name: str
    prefix: list[str]
    edged: str
    seen: str  # the smoke directory as the commands see it
    host: Path  # the same directory on this machine

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root" if self.prefix else os.environ["HOME"]}
        return subprocess.run([*self.prefix, self.edged, *argv], env=env, check=check,
                              capture_output=True, text=True)


def faces(target: Target, backend: str) -> tuple[list[dict], float]:
    """`edged run` with the face model on this backend; the detections and ms per inference."""
    config = f"{target.seen}/edged-{backend}.toml"
    (target.host / f"edged-{backend}.toml").write_text(
        f'[socket]\npath = "{target.seen}/edged.sock"\n[store]\npath = "{target.seen}/store"\n'
        f'[models.face]\nbackend = "{backend}"\n')
    (target.host / "edged.sock").unlink(missing_ok=True)
    started = time.monotonic()
    log_path = target.host / f"run-{target.name}-{backend}.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([*target.prefix, target.edged, "run", "--config", config],
                                  env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"},
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        predict = ["predict", "--config", config, "--model", "face", "--json",
                   "--input", f"{target.seen}/astronaut.png"]
        while True:
            if daemon.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(f"{target.name} edged run ({backend}) did not serve: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            if (target.host / "edged.sock").exists():
                out = target.run(*predict, check=False)
                if out.returncode == 0:
                    break
            time.sleep(1)
        step(f"{target.name} {backend}: edged run to first answer", started)
        python = str(Path(target.edged).parent / "python")
        timing = subprocess.run([*target.prefix, python, "-c", TIME_INFERENCE, f"{target.seen}/edged.sock"],
                                check=True, capture_output=True, text=True,
                                env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"})
        return json.loads(out.stdout)["detections"], float(timing.stdout)
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def differences(arm: list[dict], x86: list[dict]) -> tuple[float, float]:
    """The largest box coordinate (px) and score differences between matching detections."""
    pairs = list(zip(arm, x86, strict=False))  # the caller compares the counts
    box = max((abs(a - b) for d, e in pairs for a, b in zip(d["box"], e["box"], strict=True)), default=0.0)
    score = max((abs(d["score"] - e["score"]) for d, e in pairs), default=0.0)
    return box, score


def prepare(host: Path, seen: str, name: str, prefix: list[str], edged: str) -> Target:
    """The picture, the model and its store in `host`, for one target."""
    shutil.copy2(SAMPLE, host / "face.tflite")
    pin = json.loads((ROOT / "models/samples.json").read_text())["models"]["face"]
    (host / "preprocess.json").write_text(json.dumps(pin["preprocessing"]))
    (host / "decoder.json").write_text(json.dumps(pin["decoder"]))
    # The face picture the tests compare with MediaPipe (skimage's astronaut).
    subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                    "import sys, cv2, skimage.data; cv2.imwrite(sys.argv[1], "
                    "cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))",
                    str(host / "astronaut.png")], check=True)
    target = Target(name, prefix, edged, seen, host)
    target.run("models", "add", "face", f"{seen}/face.tflite", "--version", "1", "--activate",
               "--preprocess", f"{seen}/preprocess.json", "--decoder", f"{seen}/decoder.json",
               "--store", f"{seen}/store")
    return target


def cmd_smoke(args: argparse.Namespace) -> None:
    debs = [Path(args.deb)] if args.deb else sorted((ROOT / "dist").glob("edged_*_arm64.deb"))
    if not debs or not debs[-1].exists() or not SAMPLE.exists():
        sys.exit("arm64: needs an arm64 .deb (tools/build_deb.sh --arch arm64) and the sample "
                 f"model {SAMPLE} (tools/fetch_models.py)")
    deb = debs[-1]
    tarball = cmd_rootfs(args)
    results: dict[tuple[str, str], tuple[list[dict], float]] = {}
    with tempfile.TemporaryDirectory(prefix="edged-x86-smoke.") as x86_dir:
        x86 = prepare(Path(x86_dir), x86_dir, "x86_64", [], str(ROOT / ".venv/bin/edged"))
        for backend in ("openvino", "litert"):
            results["x86_64", backend] = faces(x86, backend)
    started = time.monotonic()
    with chroot(tarball) as root:
        (root / "smoke").mkdir()
        shutil.copy2(deb, root / "smoke" / deb.name)
        run(root, f"apt-get update -qq && apt-get install -y -qq /smoke/{deb.name}",
            stdout=subprocess.DEVNULL)
        step(f"apt-get install {deb.name} ({deb.stat().st_size >> 20} MiB)", started)
        started = time.monotonic()
        version = run(root, "/opt/edged/bin/edged --version", capture_output=True, text=True).stdout.strip()
        step(f"edged --version: {version}", started)
        arm = prepare(root / "smoke", "/smoke", "arm64", ["chroot", str(root)], "/opt/edged/bin/edged")
        for backend in ("openvino", "litert"):
            results["arm64", backend] = faces(arm, backend)
    failed = False
    for backend in ("openvino", "litert"):
        (arm_faces, arm_ms), (x86_faces, x86_ms) = results["arm64", backend], results["x86_64", backend]
        box, score = differences(arm_faces, x86_faces)
        ok = len(arm_faces) == len(x86_faces) > 0 and box <= BOX_TOLERANCE_PX and score <= SCORE_TOLERANCE
        failed |= not ok
        scores = ", ".join(f"{d['score']:.4f}" for d in arm_faces)
        print(f"{'PASS' if ok else 'FAIL'} {backend}: arm64 {len(arm_faces)} face(s) (scores {scores}), "
              f"x86 {len(x86_faces)}; largest difference: box {box:.3f} px, score {score:.4f}; "
              f"per inference: arm64 (emulated) {arm_ms:.0f} ms, x86 {x86_ms:.2f} ms", flush=True)
    if failed:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("rootfs").set_defaults(func=cmd_rootfs)
    build = sub.add_parser("build")
    build.add_argument("--outdir", default=str(ROOT / "dist"))
    build.set_defaults(func=cmd_build)
    smoke = sub.add_parser("smoke")
    smoke.add_argument("--deb", help="the arm64 .deb (default: the newest in dist/)")
    smoke.set_defaults(func=cmd_smoke)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("arm64: needs root (binfmt_misc, debootstrap, chroot, mounts)")
    args.func(args)


if __name__ == "__main__":
    main()
