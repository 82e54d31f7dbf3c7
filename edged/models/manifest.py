"""The manifest that travels with every model version.

A manifest is untrusted input: names are plain names (never paths), sizes are
bounded, hashes are hex SHA-256, and nothing outside a closed set of formats
is accepted.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edged.errors import InvalidInput

MAX_MANIFEST_BYTES = 1 << 20
# Names start with a letter or digit so they can never be ".", "..", a hidden
# control file of the store, or an option; "/" is not allowed anywhere.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
FileName = Annotated[str, StringConstraints(pattern=FILE_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

ModelFormat = Literal["tflite", "openvino", "onnx"]
ENTRY_SUFFIX: dict[str, str] = {"tflite": ".tflite", "openvino": ".xml", "onnx": ".onnx"}


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: FileName = Field(description="File name inside the version directory; never a path.")
    sha256: Sha256 = Field(description="Lower-case hex SHA-256 of the file's bytes.")
    size: StrictInt = Field(ge=0, le=1 << 40, description="Size in bytes.")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelName = Field(description="Model name, as clients address it.")
    version: Version = Field(description="Version label; compared naturally (2 < 10).")
    format: ModelFormat = Field(description="Model format: tflite, openvino (IR .xml+.bin) or onnx.")
    files: list[ManifestFile] = Field(min_length=1, max_length=32, description="Every file of the model.")
    labels: list[str] | None = Field(default=None, max_length=100_000, description="Class labels.")
    preprocessing: dict[str, Any] | None = Field(
        default=None, description="How to turn an image or a sample window into the model input."
    )
    decoder: dict[str, Any] | None = Field(
        default=None, description="How to turn the output tensors into results, e.g. {type: blazeface}."
    )
    description: str = Field(default="", max_length=2000, description="Free text for people.")

    @model_validator(mode="after")
    def _one_entry_file(self) -> Manifest:
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names must be unique")
        suffix = ENTRY_SUFFIX[self.format]
        entries = [n for n in names if n.endswith(suffix)]
        if len(entries) != 1:
            raise ValueError(f"a {self.format} model needs exactly one {suffix} file, got {len(entries)}")
        if self.format == "openvino" and entries[0][: -len(".xml")] + ".bin" not in names:
            raise ValueError(f"an OpenVINO IR needs {entries[0][:-4]}.bin beside {entries[0]}")
        return self

    @property
    def entry(self) -> str:
        """The file a backend opens (the IR's .bin is found beside its .xml)."""
        suffix = ENTRY_SUFFIX[self.format]
        return next(f.name for f in self.files if f.name.endswith(suffix))

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidInput(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise InvalidInput(f"invalid manifest: {one_line(exc)}") from None


def guess_format(paths: list[Path]) -> str:
    """The format implied by the files' suffixes, or InvalidInput saying why not."""
    for fmt, suffix in ENTRY_SUFFIX.items():
        if any(p.name.endswith(suffix) for p in paths):
            return fmt
    raise InvalidInput("cannot tell the model format: expected a .tflite, .xml or .onnx file")


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def one_line(exc: ValidationError) -> str:
    """A pydantic error as `field: message; field: message` on one line."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def is_valid_name(value: str) -> bool:
    return re.fullmatch(NAME_PATTERN.strip("^$"), value) is not None


def check_name(value: str, what: str = "model name") -> str:
    """Return `value` if it is a valid model name, version or file name, else raise InvalidInput."""
    if not isinstance(value, str):
        raise InvalidInput(f"invalid {what} {value!r}: not a string")
    pattern = {"version": VERSION_PATTERN, "file name": FILE_PATTERN}.get(what, NAME_PATTERN)
    if re.fullmatch(pattern.strip("^$"), value) is None:
        raise InvalidInput(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-'")
    return value
