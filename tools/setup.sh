#!/usr/bin/env bash
# Set up edged on a Debian/Ubuntu machine: system packages, a venv in .venv,
# and the sample models (cached outside git). Safe to run again.
#   tools/setup.sh            # for development and tests
#   tools/setup.sh --samples  # also add the sample models to the daemon's store
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd (systemd-analyze), dpkg-dev and lintian: the unit and .deb tests; systemd-container
# (systemd-nspawn), debootstrap and zstd: the boot test's Debian container; qemu-user-static
# and binfmt-support: the arm64 package's build and smoke test under emulation; socat: the
# shared-memory test bridges a TCP port to the socket for Triton's own HTTP client (TCP only).
packages=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev mosquitto systemd dpkg-dev lintian
          systemd-container debootstrap zstd qemu-user-static binfmt-support socat)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

if [ "${1:-}" = "--samples" ]; then
  .venv/bin/python tools/fetch_models.py --add-to-store
else
  .venv/bin/python tools/fetch_models.py >/dev/null
fi
echo "edged is set up in .venv"
