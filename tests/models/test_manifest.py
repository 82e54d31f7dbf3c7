"""Unit tests for the model manifest: an untrusted document, validated strictly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edged.errors import InvalidInput
from edged.models.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestFile,
    check_name,
    guess_format,
    sha256_of,
)

SHA = "0123456789abcdef" * 4


def doc(**changes) -> dict:
    """A valid tflite manifest document, with `changes` applied."""
    base = {
        "name": "face",
        "version": "1",
        "format": "tflite",
        "files": [{"name": "face.tflite", "sha256": SHA, "size": 10}],
    }
    base.update(changes)
    return base


def file_entry(name: str, sha256: str = SHA, size: int = 10) -> dict:
    return {"name": name, "sha256": sha256, "size": size}


def parse(document: dict) -> Manifest:
    return Manifest.from_json(json.dumps(document).encode())


def refused(document: dict | bytes) -> str:
    """The one-line message InvalidInput gives for `document`."""
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(InvalidInput) as info:
        Manifest.from_json(data)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- valid manifests ------------------------------------------------------------
def test_a_minimal_tflite_manifest() -> None:
    manifest = parse(doc())
    assert manifest.name == "face"
    assert manifest.version == "1"
    assert manifest.format == "tflite"
    assert manifest.files == [ManifestFile(name="face.tflite", sha256=SHA, size=10)]
    assert manifest.entry == "face.tflite"
    assert manifest.labels is None
    assert manifest.preprocessing is None
    assert manifest.description == ""


def test_an_openvino_ir_manifest_finds_its_xml() -> None:
    manifest = parse(doc(format="openvino", files=[file_entry("net.bin", size=0), file_entry("net.xml")]))
    assert manifest.entry == "net.xml"
    assert manifest.files[0].size == 0


def test_an_onnx_manifest_with_extras() -> None:
    manifest = parse(doc(
        format="onnx",
        files=[file_entry("labels.txt"), file_entry("net.onnx", size=1 << 40)],
        labels=["cat", "dog"],
        preprocessing={"resize": [224, 224], "mean": [0.5, 0.5, 0.5]},
        description="two animals",
        version="2.0.1+build-7",
    ))
    assert manifest.entry == "net.onnx"
    assert manifest.labels == ["cat", "dog"]
    assert manifest.preprocessing == {"resize": [224, 224], "mean": [0.5, 0.5, 0.5]}
    assert manifest.version == "2.0.1+build-7"


def test_to_json_round_trips_and_omits_nothing_set() -> None:
    manifest = parse(doc(labels=["a"], description="d"))
    data = manifest.to_json()
    assert data.endswith(b"\n")
    assert Manifest.from_json(data) == manifest
    loaded = json.loads(data)
    assert "preprocessing" not in loaded  # None fields are left out
    assert list(loaded) == sorted(loaded)  # stable, sorted keys
    assert loaded["files"] == [{"name": "face.tflite", "sha256": SHA, "size": 10}]


def test_a_manifest_at_the_size_limit_is_accepted() -> None:
    data = json.dumps(doc()).encode()
    padded = data + b" " * (MAX_MANIFEST_BYTES - len(data))
    assert len(padded) == MAX_MANIFEST_BYTES
    assert Manifest.from_json(padded).name == "face"


def test_manifests_are_frozen() -> None:
    manifest = parse(doc())
    with pytest.raises(ValueError, match="frozen"):
        manifest.name = "other"


# --- rejections -----------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["../face.tflite", "/etc/face.tflite", "a/b.tflite", ".hidden.tflite", "..", ".", "",
            "face.tflite\n", "-face.tflite", "x" * 129 + ".tflite", "face\\x.tflite", "fa ce.tflite"],
)
def test_file_names_must_be_plain_names(bad: str) -> None:
    message = refused(doc(files=[file_entry(bad)]))
    assert message.startswith("invalid manifest: files.0.name:")


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "/abs", "", "x\n", "x" * 65, "-x", "a+b"])
def test_model_names_must_be_plain_names(bad: str) -> None:
    message = refused(doc(name=bad))
    assert message.startswith("invalid manifest: name:")


@pytest.mark.parametrize("bad", ["../1", "1/2", ".1", "", "1\n", "1" * 65])
def test_versions_must_be_plain_labels(bad: str) -> None:
    assert refused(doc(version=bad)).startswith("invalid manifest: version:")


def test_duplicate_files_are_refused() -> None:
    message = refused(doc(files=[file_entry("face.tflite"), file_entry("face.tflite")]))
    assert "file names must be unique" in message


def test_a_tflite_model_needs_a_tflite_file() -> None:
    message = refused(doc(files=[file_entry("face.bin")]))
    assert "a tflite model needs exactly one .tflite file, got 0" in message


def test_a_tflite_model_needs_exactly_one_tflite_file() -> None:
    message = refused(doc(files=[file_entry("a.tflite"), file_entry("b.tflite")]))
    assert "exactly one .tflite file, got 2" in message


def test_an_ir_needs_its_bin() -> None:
    message = refused(doc(format="openvino", files=[file_entry("net.xml")]))
    assert "needs net.bin beside net.xml" in message
    message = refused(doc(format="openvino", files=[file_entry("net.xml"), file_entry("other.bin")]))
    assert "needs net.bin" in message


def test_an_ir_needs_an_xml() -> None:
    assert "exactly one .xml file" in refused(doc(format="openvino", files=[file_entry("net.bin")]))


@pytest.mark.parametrize("bad", ["", "abc", SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, SHA[:-1] + " "])
def test_sha256_must_be_64_lowercase_hex_digits(bad: str) -> None:
    assert refused(doc(files=[file_entry("face.tflite", sha256=bad)])).startswith(
        "invalid manifest: files.0.sha256:"
    )


@pytest.mark.parametrize("bad", [-1, (1 << 40) + 1, 1.5, "ten", None, [10]])
def test_sizes_must_be_bounded_integers(bad) -> None:
    assert refused(doc(files=[file_entry("face.tflite", size=bad)])).startswith(
        "invalid manifest: files.0.size:"
    )


def test_extra_top_level_fields_are_refused() -> None:
    message = refused(doc(entrypoint="../../bin/sh"))
    assert message.startswith("invalid manifest: entrypoint:")
    assert "Extra inputs are not permitted" in message


def test_extra_file_fields_are_refused() -> None:
    message = refused(doc(files=[{**file_entry("face.tflite"), "path": "/etc/passwd"}]))
    assert message.startswith("invalid manifest: files.0.path:")


def test_an_unknown_format_is_refused() -> None:
    assert refused(doc(format="pytorch")).startswith("invalid manifest: format:")


@pytest.mark.parametrize("field", ["name", "version", "format", "files"])
def test_required_fields(field: str) -> None:
    document = doc()
    del document[field]
    message = refused(document)
    assert message.startswith(f"invalid manifest: {field}:")
    assert "Field required" in message


def test_files_must_not_be_empty_or_too_many() -> None:
    assert refused(doc(files=[])).startswith("invalid manifest: files:")
    many = [file_entry(f"f{i}.txt") for i in range(32)] + [file_entry("face.tflite")]
    assert refused(doc(files=many)).startswith("invalid manifest: files:")


def test_a_long_description_is_refused() -> None:
    assert refused(doc(description="x" * 2001)).startswith("invalid manifest: description:")


def test_an_oversize_manifest_is_refused_before_parsing() -> None:
    data = json.dumps(doc()).encode()
    padded = data + b" " * (MAX_MANIFEST_BYTES + 1 - len(data))
    message = refused(padded)
    assert message == f"manifest is {MAX_MANIFEST_BYTES + 1} bytes, over the {MAX_MANIFEST_BYTES} limit"


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"face"'])
def test_documents_that_are_not_manifests(data: bytes) -> None:
    assert refused(data).startswith("invalid manifest: manifest:")


def test_several_errors_stay_on_one_line_and_name_each_field() -> None:
    message = refused(doc(name="../x", files=[file_entry("face.tflite", sha256="nope", size=-3)]))
    assert "name:" in message
    assert "files.0.sha256:" in message
    assert "files.0.size:" in message
    assert message.count(";") >= 2


# --- helpers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("names", "fmt"),
    [(["m.tflite"], "tflite"), (["m.xml", "m.bin"], "openvino"), (["m.bin", "m.xml"], "openvino"),
     (["labels.txt", "m.onnx"], "onnx"), (["m.onnx", "m.tflite"], "tflite")],
)
def test_guess_format(names: list[str], fmt: str) -> None:
    assert guess_format([Path("/some/dir") / n for n in names]) == fmt


@pytest.mark.parametrize("names", [[], ["m.bin"], ["m.tflite.txt"], ["xml"]])
def test_guess_format_refuses_unknown_files(names: list[str]) -> None:
    with pytest.raises(InvalidInput, match=r"expected a \.tflite, \.xml or \.onnx file"):
        guess_format([Path(n) for n in names])


def test_sha256_of_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert sha256_of(empty) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("good", ["face", "Face_2", "a", "0", "m.v2-x", "x" * 64])
def test_check_name_accepts_plain_names(good: str) -> None:
    assert check_name(good) == good


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "a/b", ".hidden", "/abs", "-x", "_x", "x" * 65, "a b", "a+b",
            "x\n", "\nx", "x\x00", "é"],
)
def test_check_name_refuses_anything_else(bad: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model name") as info:
        check_name(bad)
    assert "\n" not in str(info.value)


def test_check_name_for_versions_allows_plus_and_names_what() -> None:
    assert check_name("1.0+build", "version") == "1.0+build"
    with pytest.raises(InvalidInput, match="invalid version '1/2'"):
        check_name("1/2", "version")
    with pytest.raises(InvalidInput, match="invalid version"):
        check_name("1\n", "version")
    with pytest.raises(InvalidInput, match="invalid file name"):
        check_name(".x", "file name")
