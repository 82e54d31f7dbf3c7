"""The arm64 package under QEMU user emulation: `tools/build_deb.sh --arch arm64` builds
it inside an arm64 Debian rootfs, and `tools/arm64.py smoke` installs it into a fresh one,
runs `edged --version`, `edged run` and `edged predict` on a face picture with OpenVINO and
with LiteRT, and fails unless the faces match this machine's x86 build (1 px, 0.01 score).

Part of .ci/run: with the arm64 rootfs cached (/var/cache/edged-arm64) it adds about
7.5 minutes to the suite on 2 shared cores (build 5, smoke 2.5), and building the rootfs
about 5 more. Needs root, a kernel with binfmt_misc and CAP_SYS_ADMIN for the chroot's
mounts; tools/arm64.py installs QEMU and registers it. EDGED_TEST_ARM64=0 skips it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cannot_emulate() -> str | None:
    """Why this machine cannot run the arm64 package under emulation, or None."""
    if os.environ.get("EDGED_TEST_ARM64") == "0":
        return "EDGED_TEST_ARM64=0 skips the arm64 build and smoke test (~7.5 min)"
    if os.geteuid() != 0:
        return "arm64 emulation needs root (binfmt_misc, debootstrap, chroot, mounts)"
    if not Path("/proc/sys/fs/binfmt_misc").exists():
        return "this kernel has no binfmt_misc, so QEMU cannot run arm64 binaries"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no CAP_SYS_ADMIN for the chroot's mounts: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_cannot_emulate() is not None, reason=_cannot_emulate() or "")
def test_the_arm64_package_installs_runs_and_finds_the_same_faces_as_x86(tmp_path: Path) -> None:
    build = subprocess.run([str(ROOT / "tools/build_deb.sh"), "--arch", "arm64", str(tmp_path)],
                           capture_output=True, text=True, env=dict(os.environ, DEB_COMPRESSION="gzip"))
    print(build.stderr)
    assert build.returncode == 0, build.stderr[-3000:]
    deb = Path(build.stdout.strip().splitlines()[-1])
    assert deb.name.endswith("_arm64.deb") and deb.exists()
    info = subprocess.run(["dpkg-deb", "--field", str(deb), "Architecture"], capture_output=True, text=True)
    assert info.stdout.strip() == "arm64"

    smoke = subprocess.run(["python3", str(ROOT / "tools/arm64.py"), "smoke", "--deb", str(deb)],
                           capture_output=True, text=True)
    print(smoke.stdout, smoke.stderr)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    for backend in ("openvino", "litert"):
        assert f"PASS {backend}: arm64 1 face(s)" in smoke.stdout
