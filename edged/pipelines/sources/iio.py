"""Sensor samples from a Linux IIO device's channels in sysfs, read at a fixed rate.

A channel is read from its `_input` file (already in units) or its `_raw` file,
which becomes (raw + offset) * scale as the kernel's IIO ABI says, with `_offset`
and `_scale` from the channel or shared by its type (`in_accel_scale` for
`in_accel_x`). A device that disappears is looked for again with a doubling
backoff, like a camera; a value that does not read as a number is counted and
its sample skipped.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edged.config import SourceSettings
from edged.pipelines.sources.lines import FLOAT32_MAX, SampleWindow
from edged.pipelines.sources.sensors import SampleSource

CHANNEL_FILE = re.compile(r"^(in_.+)_(raw|input)$")


class DeviceGone(Exception):
    """The device or one of its channels cannot be read (any more)."""


@dataclass(frozen=True)
class Channel:
    name: str
    path: Path  # its _input or _raw file
    offset: float
    scale: float


def _number(path: Path) -> float:
    text = path.read_text().strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path.name} holds {text[:40]!r}, not a number") from None


def _attribute(device: Path, channel: str, attribute: str, default: float) -> float:
    """A channel's own `_scale` / `_offset`, else the one its type shares, else `default`."""
    kind = re.match(r"in_[a-z]+", channel)
    for name in (channel, kind.group(0) if kind else None):
        if name and (device / f"{name}_{attribute}").is_file():
            return _number(device / f"{name}_{attribute}")
    return default


def find_device(base: Path, wanted: str) -> Path:
    """The device directory called `wanted` (`iio:device0`), or whose `name` file says it."""
    if (base / wanted).is_dir():
        return base / wanted
    for device in sorted(base.glob("iio:device*")):
        try:
            if (device / "name").read_text().strip() == wanted:
                return device
        except OSError:
            continue
    raise DeviceGone(f"no IIO device {wanted!r} in {base}")


def find_channels(device: Path, wanted: list[str]) -> list[Channel]:
    files: dict[str, Path] = {}
    for path in sorted(device.iterdir()):
        match = CHANNEL_FILE.match(path.name)
        if match and (match.group(2) == "input" or match.group(1) not in files):
            files[match.group(1)] = path  # _input wins over _raw
    names = wanted or sorted(files)
    if not names:
        raise DeviceGone(f"{device.name} has no input channels")
    missing = [name for name in names if name not in files]
    if missing:
        raise DeviceGone(f"{device.name} has no channel {missing[0]} (it has {', '.join(sorted(files))})")
    channels = []
    for name in names:
        path = files[name]
        if path.name.endswith("_input"):
            channels.append(Channel(name, path, 0.0, 1.0))
        else:
            channels.append(Channel(name, path, _attribute(device, name, "offset", 0.0),
                                    _attribute(device, name, "scale", 1.0)))
    return channels


class IioSource(SampleSource):
    def __init__(self, settings: SourceSettings, name: str) -> None:
        super().__init__(settings, name)
        self.channels: list[Channel] = []

    def details(self) -> dict:
        return {**super().details(), "channels": [c.name for c in self.channels]}

    def _run(self) -> None:
        base = Path(self.settings.iio_base_dir)
        while not self._stop.is_set():
            try:
                device = find_device(base, str(self.settings.uri))
                self.channels = find_channels(device, self.settings.iio_channels)
                if self.settings.channels and len(self.channels) != self.settings.channels:
                    raise DeviceGone(f"{device.name} has {len(self.channels)} input channels, "
                                     f"not source.channels = {self.settings.channels}")
            except (DeviceGone, OSError, ValueError) as exc:
                if not self._lost(str(exc)):
                    break
                continue
            if self.window is None or self.window.channels != len(self.channels):
                self.window = SampleWindow(self.settings.window, self.settings.stride, len(self.channels))
            self.window.reset()  # a window must not span the gap
            self._connected()
            try:
                self._poll()
                break  # asked to stop
            except OSError as exc:  # ENODEV, or ENOENT once the directory is gone
                if not self._lost(f"{device.name} went away ({exc.strerror})"):
                    break

    def _poll(self) -> None:
        period = 1.0 / self.settings.sample_rate_hz
        next_at = time.monotonic()
        sample = np.zeros(len(self.channels), np.float64)
        while not self._stop.is_set():
            try:
                for index, channel in enumerate(self.channels):
                    raw = _number(channel.path)
                    sample[index] = (raw + channel.offset) * channel.scale
                if not (np.abs(sample) <= FLOAT32_MAX).all():
                    raise ValueError("a channel reads as a non-finite value")
            except ValueError as exc:
                self.rejects.note(str(exc))
            else:
                self.push(sample.astype(np.float32))
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -period:  # fell behind (a slow bus): do not try to catch up
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(max(delay, 0.0))
