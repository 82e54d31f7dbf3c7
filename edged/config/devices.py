"""Where a model runs: OpenVINO device strings and LiteRT delegates, as the config gives them.

The forms are checked when the config loads, so a typo (`GPU1`, `AUTO:GPU;CPU`) is refused
with the forms that are accepted rather than failing at the first load. Whether the device
is present is the backend's question, at load time (edged/backends/openvino.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from edged.config.base import Section

_PHYSICAL = re.compile(r"(CPU|GPU|NPU)(\.\d+)?")
FORMS = ("CPU, GPU, NPU (or one of several: GPU.1), AUTO, AUTO:<devices> or HETERO:<devices>, "
         "<devices> being physical devices separated by commas (AUTO:GPU,CPU)")


@dataclass(frozen=True)
class OpenVINODevice:
    """A parsed device string: `kind` is "physical", "AUTO" or "HETERO"; `devices` the
    physical devices it names (none for a bare AUTO, which chooses among all present)."""

    text: str
    kind: str
    devices: tuple[str, ...]

    @property
    def virtual(self) -> bool:
        return self.kind != "physical"


def parse_device(text: str) -> OpenVINODevice:
    """The device `text` names; ValueError saying which forms are accepted."""
    head, colon, tail = text.partition(":")
    if not colon:
        if text == "AUTO":
            return OpenVINODevice(text, "AUTO", ())
        if _PHYSICAL.fullmatch(text):
            return OpenVINODevice(text, "physical", (text,))
    elif head in ("AUTO", "HETERO"):
        devices = tuple(tail.split(","))
        if all(_PHYSICAL.fullmatch(d) for d in devices) and len(set(devices)) == len(devices):
            return OpenVINODevice(text, head, devices)
    raise ValueError(f"not one of the OpenVINO device forms edged accepts: {FORMS}")


class DelegateSettings(Section):
    library: str = Field(
        min_length=1,
        description=("The LiteRT delegate's shared library: a path, or a name the dynamic loader "
                     "finds (libedgetpu.so.1 for a Coral Edge TPU)."),
    )
    options: dict[str, str] = Field(
        default={},
        description="Options handed to the delegate as they are (Edge TPU: device = \"usb\", \"pci:0\").",
    )

    @field_validator("library")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if value != value.strip() or "\n" in value or "\0" in value:
            raise ValueError("a library name or path on one line, without surrounding spaces")
        return value
