#!/usr/bin/env bash
# Build edged_<version>_<arch>.deb from this checkout: edged and its Python
# dependencies in a venv under /opt/edged, the systemd units, the commented
# default /etc/edged/edged.toml (a conffile) and the maintainer scripts.
#   tools/build_deb.sh [--arch ARCH] [OUTDIR]   # default: this machine's, dist/
# It prints the .deb's path. `--arch arm64` on another machine builds inside an
# arm64 Debian rootfs under QEMU user emulation (tools/arm64.py build; as root,
# ~1 min of set-up plus several minutes emulated, see tools/arm64.py).
# Needs dpkg-dev and, for systemd-python, gcc, pkg-config, python3-dev and
# libsystemd-dev (tools/setup.sh installs them). PYTHON picks the interpreter
# (default /usr/bin/python3.11, the one the package depends on); DEB_COMPRESSION
# the dpkg-deb compressor (default xz).
#
# The venv is made by `python -m venv` directly in the staging tree
# (STAGE/opt/edged) and then moved into place by rewriting the staging path in
# the few files that hold it: the console scripts' shebangs and pyvenv.cfg.
# Nothing else in a venv records its own path (sys.prefix is found at run time
# from pyvenv.cfg), and the build fails if the staging path is left anywhere.
# This needs no root and never touches a real /opt/edged, which may hold an
# installed edged. The venv links to the system interpreter, so the package
# depends on python3.11, not on python3-venv or pip.
set -euo pipefail
cd "$(dirname "$0")/.."

host_arch=$(dpkg --print-architecture)
arch=$host_arch
if [ "${1:-}" = "--arch" ]; then
    arch=${2:?build_deb: --arch needs an architecture}
    shift 2
fi
if [ "$arch" != "$host_arch" ]; then
    [ "$arch" = arm64 ] || { echo "build_deb: can build for $host_arch or arm64, not $arch" >&2; exit 2; }
    exec python3 tools/arm64.py build --outdir "${1:-dist}"
fi

python=${PYTHON:-/usr/bin/python3.11}
outdir=$(realpath -m "${1:-dist}")
prefix=/opt/edged
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' edged/__init__.py)
maintainer="${DEBFULLNAME:-edged developers} <${DEBEMAIL:-edged@example.org}>"
[ -n "$version" ] || { echo "build_deb: no __version__ in edged/__init__.py" >&2; exit 1; }
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

work=$(mktemp -d "${TMPDIR:-/tmp}/edged-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps expects a package tree at debian/<package>/ with a DEBIAN/ in it.
root=$work/debian/edged
venv=$root$prefix
site=$venv/lib/python$pyver/site-packages

echo "build_deb: edged $version for $arch with $python" >&2

# 1. The wheel, from a copy of the sources, so no build/ or *.egg-info is left
#    in the checkout and nothing but the package goes in.
mkdir -p "$work/src" "$work/wheels"
cp -r edged pyproject.toml README.md "$work/src/"
find "$work/src" -name __pycache__ -type d -prune -exec rm -rf {} +

# 2. The venv, with edged and its dependencies (wheels from PyPI; systemd-python
#    is built from source against libsystemd). pip stays out of the package.
# A pip cache of its own: a wheel that pip built for another interpreter with
# the same tag (a pyenv python, say) links to that interpreter's paths.
cache=${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/edged/deb-pip/$(realpath "$python" | md5sum | cut -c1-12)
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet --cache-dir "$cache")
"${pip[@]}" wheel --no-deps --wheel-dir "$work/wheels" "$work/src"
"${pip[@]}" install --no-compile --use-pep517 "$work"/wheels/edged-*.whl

# 3. Trim: the installer, caches, and tests of dependencies nothing imports.
"${pip[@]}" uninstall --yes pip setuptools >/dev/null 2>&1 || true
rm -rf "$venv"/bin/pip* "$venv"/bin/activate* "$venv"/bin/Activate.ps1 \
    "$site"/_distutils_hack "$site"/distutils-precedence.pth \
    "$site"/pip "$site"/pip-* "$site"/setuptools "$site"/setuptools-* "$site"/pkg_resources
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
rmdir "$venv/include/python$pyver" "$venv/include"  # headers for building extensions: none
find "$site/numpy" -name tests -type d -prune -exec rm -rf {} +
# OpenVINO's GPU and NPU plugins stay: `device = "GPU"`/`"NPU"` load them (an
# Intel iGPU or NPU, docs/accelerators.md). LiteRT's accelerator and vendor (NPU)
# plugins are never loaded (edged uses its interpreter, and delegates by path),
# and the vendor ones link to another OpenVINO release than the one installed.
rm -rf "$site"/ai_edge_litert/libLiteRtWebGpuAccelerator.so "$site"/ai_edge_litert/vendors
# A tool that applies NPU compiler plugins, with an RPATH to the system's lib dirs.
rm -f "$site"/ai_edge_litert/tools/apply_plugin_main
# Only commands keep an exec bit: modules, shared libraries and data files that
# wheels mark executable are not run (and lintian says so). One Python process
# reads every file's first bytes (a process per file costs minutes under QEMU).
"$python" - "$site" <<'PY'
import os, sys
for top, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(top, name)
        mode = os.lstat(path).st_mode
        if not mode & 0o111 or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if name.endswith((".py", ".so")) or ".so." in name or not head.startswith((b"#!", b"\x7fELF")):
            os.chmod(path, mode & ~0o111)
PY
# systemd-python is built here, with its symbols; the wheels' binaries are left as
# they come: strip can corrupt the libraries auditwheel rewrote with patchelf.
strip --strip-unneeded "$site"/systemd/*.so
# direct_url.json only records the build's temporary wheel path.
rm -f "$site"/edged-*.dist-info/direct_url.json
sed -i '/direct_url\.json/d' "$site"/edged-*.dist-info/RECORD

# 4. Move the venv to /opt/edged: shebangs and pyvenv.cfg.
for script in "$venv"/bin/*; do
    if [ -f "$script" ] && [ ! -L "$script" ]; then
        sed -i "1s|^#!$venv/bin/|#!$prefix/bin/|" "$script"
    fi
done
sed -i "s|$venv|$prefix|g" "$venv/pyvenv.cfg"
if leftover=$(grep -rlF "$work" "$root"); then
    echo "build_deb: the staging path is still in:" >&2
    echo "$leftover" >&2
    exit 1
fi
# A library may find its neighbours through $ORIGIN, never through a path of
# the build machine.
mapfile -t elves < <("$python" - "$root" <<'PY'
import os, sys
for top, _dirs, files in os.walk(sys.argv[1]):
    for name in sorted(files):
        path = os.path.join(top, name)
        if os.path.islink(path) or not (name.endswith(".so") or ".so." in name or os.stat(path).st_mode & 0o111):
            continue
        with open(path, "rb") as f:
            if f.read(4) == b"\x7fELF":
                print(path)
PY
)
# One readelf for all of them; it heads each file's section with "File: <path>".
# shellcheck disable=SC2016  # $ORIGIN is meant literally
if outside=$(readelf -d "${elves[@]}" | awk '/^File: /{file=$2} /\((RPATH|RUNPATH)\)/ && !/\[(\$ORIGIN[^]:]*:?)+\]$/{print file": "$0}') \
        && [ -n "$outside" ]; then
    echo "build_deb: search paths outside the package:" >&2
    echo "$outside" >&2
    exit 1
fi

# 5. Units, the default config, documentation.
install -D -m 0644 -t "$root/lib/systemd/system" \
    systemd/edged.service systemd/edged.socket systemd/edged-registry.service
install -D -m 0644 packaging/edged.toml "$root/etc/edged/edged.toml"
doc=$root/usr/share/doc/edged
install -D -m 0644 -t "$doc" packaging/deb/copyright README.md docs/service.md docs/configuration.md
gzip -9n "$doc/configuration.md"
date=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
printf 'edged (%s) unstable; urgency=medium\n\n  * Release %s; see CHANGELOG.md in the source.\n\n -- %s  %s\n' \
    "$version" "$version" "$maintainer" "$date" | gzip -9n > "$doc/changelog.gz"
install -D -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/edged"
mkdir -p "$root/usr/bin"
ln -s "$prefix/bin/edged" "$root/usr/bin/edged"
ln -s "$prefix/bin/edged-registry" "$root/usr/bin/edged-registry"

# Modes as the package needs them whatever the build's umask: readable by all
# (the daemon runs as edged), writable by root only. Links are skipped, or the
# interpreter they point to would change.
find "$root" ! -type l -exec chmod u+w,go-w,a+rX {} +

# 6. Depends: the interpreter the venv links to, adduser for the users, procps
#    for the units' ExecReload=/bin/kill, and the system libraries the bundled
#    binaries need (dpkg-shlibdeps reads them; the libraries the wheels bundle
#    are found through their $ORIGIN RPATHs).
mkdir -p "$root/DEBIAN"
printf 'Source: edged\n\nPackage: edged\nArchitecture: any\n' > "$work/debian/control"
#    OpenVINO's GPU plugin links libOpenCL.so.1, which only a machine with an
#    Intel GPU needs (its OpenCL runtime, intel-opencl-icd, brings it): it is
#    recommended, not required, and left out of what dpkg-shlibdeps reads; the
#    plugin says what is missing when it cannot load.
required=()
recommends=""
for elf in "${elves[@]}"; do
    case $elf in
        */libopenvino_intel_gpu_plugin.so) recommends="ocl-icd-libopencl1" ;;
        *) required+=("$elf") ;;
    esac
done
shlibs=$(cd "$work" && dpkg-shlibdeps -O --ignore-missing-info "${required[@]/#/-e}" 2>"$work/shlibdeps.log" \
    | sed -n 's/^shlibs:Depends=//p') || { cat "$work/shlibdeps.log" >&2; exit 1; }
depends="python$pyver, adduser, procps${shlibs:+, $shlibs}"

# 7. Control files and the package.
install -m 0755 -t "$root/DEBIAN" packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm
echo /etc/edged/edged.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$size|" -e "s|@DEPENDS@|$depends|" \
    packaging/deb/control.in > "$root/DEBIAN/control"
if [ -n "$recommends" ]; then
    sed -i "/^Depends: /a Recommends: $recommends" "$root/DEBIAN/control"
fi
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)

mkdir -p "$outdir"
deb=$outdir/edged_${version}_${arch}.deb
# xz makes the smallest package (for devices); the tests build with gzip, ~5x faster.
dpkg-deb --root-owner-group "-Z${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
echo "build_deb: $(du -h "$deb" | cut -f1) $deb" >&2
echo "$deb"
