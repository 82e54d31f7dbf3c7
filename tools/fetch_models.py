#!/usr/bin/env python3
"""Fetch the sample models: real MediaPipe .tflite files, pinned by sha256.

The models come out of the `mediapipe==0.10.14` wheel (Apache-2.0), which is
downloaded with `pip download --no-deps` (PyPI is the only network edged's
machines may reach), so nothing is ever loaded from a model hub. Only the
files named in models/samples.json are extracted, into a cache outside git.

    tools/fetch_models.py                      # fetch into the cache, print its path
    tools/fetch_models.py --add-to-store       # also add them to the daemon's store
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "models" / "samples.json"


def cache_dir() -> Path:
    if os.environ.get("EDGED_SAMPLES_DIR"):
        return Path(os.environ["EDGED_SAMPLES_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edged" / "samples"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(directory: Path | None = None, benchmark: bool = False) -> dict[str, Path]:
    """Return {name: path} of the verified sample models, downloading them when missing.

    `benchmark`: also the pins marked `"sample": false` (models only benchmarks use,
    never added to a store).
    """
    pins = json.loads(PINS.read_text())
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {name: directory / m["file"] for name, m in pins["models"].items()
              if benchmark or m.get("sample", True)}
    missing = [n for n, p in wanted.items() if not p.exists() or _sha256(p) != pins["models"][n]["sha256"]]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            source = pins["source"]
            command = [sys.executable, "-m", "pip", "download", "--quiet", *source["pip_download_args"],
                       source["package"], "-d", tmp]
            subprocess.run(command, check=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise SystemExit(f"expected one wheel from pip download, got {wheels}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in missing:
                    pin = pins["models"][name]
                    info = wheel.getinfo(pin["member"])
                    if info.file_size != pin["size"]:
                        raise SystemExit(f"{pin['member']}: {info.file_size} bytes, pinned {pin['size']}")
                    partial = wanted[name].with_suffix(".part")
                    partial.write_bytes(wheel.read(info))
                    if _sha256(partial) != pin["sha256"]:
                        partial.unlink()
                        raise SystemExit(f"{pin['member']}: sha256 does not match the pin")
                    partial.replace(wanted[name])
    return wanted


def add_sample(store, name: str, path: Path, version: str = "1", as_name: str | None = None) -> None:
    """Add one sample model to a ModelStore with its preprocessing and decoder."""
    pin = json.loads(PINS.read_text())["models"][name]
    store.add(as_name or name, [path], version, preprocessing=pin.get("preprocessing"),
              decoder=pin.get("decoder"), description=pin["description"])


def add_to_store(paths: dict[str, Path], store_dir: str | None) -> None:
    """Make each sample's current pin (file, preprocessing, decoder) the active version.

    A store filled by an older pin keeps its versions; the new pin becomes the next one.
    """
    sys.path.insert(0, str(ROOT))
    from edged.config import load_settings
    from edged.models.store import ModelStore

    settings = load_settings(None, **({"store": {"path": store_dir}} if store_dir else {}))
    store = ModelStore(settings.store.path)
    pins = json.loads(PINS.read_text())["models"]
    for name, path in paths.items():
        pin = pins[name]
        wanted = (pin["sha256"], pin.get("preprocessing"), pin.get("decoder"))
        current = None
        for version in store.versions(name):
            manifest = store.manifest(name, version)
            if (manifest.files[0].sha256, manifest.preprocessing, manifest.decoder) == wanted:
                current = version
        if current is None:
            numbers = [int(v) for v in store.versions(name) if v.isdigit()]
            current = str(max(numbers, default=0) + 1)
            add_sample(store, name, path, version=current)
        if store.active(name) != current:
            store.activate(name, current)
        print(f"{name}: version {current} active in {store.root}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="cache directory (default ~/.cache/edged/samples)")
    parser.add_argument("--add-to-store", action="store_true", help="add the samples to the model store")
    parser.add_argument("--store", help="model store directory (default: the daemon's)")
    args = parser.parse_args()
    paths = fetch(args.dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.add_to_store:
        add_to_store(paths, args.store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
