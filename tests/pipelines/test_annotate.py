"""Pictures of what a decoder found (edged/pipelines/annotate.py), drawn from real models' outputs
on real photos: the face detector and the selfie segmenter on the astronaut, and a real
OpenVINO colour classifier; and JPEGs held to their byte bound."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.config import SinkSettings
from edged.pipelines.annotate import BOX_BGR, KEYPOINT_BGR, Seen, annotate, encode_jpeg
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import image_to_tensor
from edged.pipelines.sinks.snapshot import detected

PINS = json.loads((Path(__file__).parents[2] / "models" / "samples.json").read_text())["models"]
COLOURS = ["red", "green", "blue"]


def astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


def look(model_path: Path, model_format: str, image: np.ndarray, preprocessing: dict, decoder: dict,
         labels: list[str] | None = None) -> tuple[dict, Seen]:
    """One real inference of `image`, decoded: (result, what produced it)."""
    backend = "litert" if model_format == "tflite" else "openvino"  # OpenVINO cannot run the selfie model
    model = get_backend(backend).load(model_path, model_format, LoadOptions())
    try:
        spec = model.inputs[0]
        tensor, placement = image_to_tensor(image, spec.shape, spec.dtype, preprocessing)
        outputs = model.infer({spec.name: tensor})
    finally:
        model.close()
    decode = build_decoder(decoder, labels)
    return decode.decode(outputs, placement, image.shape[1], image.shape[0]), Seen(image, outputs, placement,
                                                                                  decode)


def build_colour_classifier(directory: Path) -> Path:
    """A real OpenVINO IR: "scores" [1, 3] = the mean of each RGB channel of a [1, 32, 32, 3] image."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 32, 32, 3], np.float32, name="image")
    scores = ops.reduce_mean(x, np.array([1, 2], np.int64), keep_dims=False)
    scores.output(0).get_tensor().set_names({"scores"})
    path = directory / "colours.xml"
    ov.save_model(ov.Model([scores], [x], "colours"), str(path), compress_to_fp16=False)
    return path


def near(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 60) -> bool:
    return bool(np.abs(pixel.astype(int) - colour).max() <= tolerance)


def drawn_at(image: np.ndarray, x: int, y: int, colour: tuple[int, int, int]) -> bool:
    """Is `colour` drawn at (x, y) or a pixel next to it (coordinates are rounded, lines smoothed)?"""
    return any(near(p, colour) for p in image[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].reshape(-1, 3))


def test_faces_are_boxed_with_their_score_and_keypoints_where_the_face_is(sample_models):
    image = astronaut()
    result, seen = look(sample_models["face"], "tflite", image, PINS["face"]["preprocessing"],
                        PINS["face"]["decoder"])
    [face] = result["detections"]
    drawn = annotate(result, seen)
    assert drawn.shape == image.shape and not np.shares_memory(drawn, image)
    assert np.array_equal(image, astronaut()), "the frame itself is never drawn on"
    x, y, w, h = (np.array(face["box"]) * 512).round().astype(int)
    # The box's edges are drawn in its colour.
    for px, py in ((x, y + h // 5), (x + w, y + h // 5), (x + w // 2, y + h)):  # off the ear keypoints
        assert drawn_at(drawn, px, py, BOX_BGR), (px, py)
    for kx, ky in (np.array(face["keypoints"]) * 512).round().astype(int):
        assert drawn_at(drawn, kx, ky, KEYPOINT_BGR), (kx, ky)
    # Far from the face, the picture is untouched.
    assert np.array_equal(drawn[300:, :], image[300:, :])
    # The score's label sits just above the box: white text on the box's colour.
    band = drawn[max(y - 20, 0):y, x:x + 40].reshape(-1, 3)
    assert any(near(p, BOX_BGR, 10) for p in band) and any(near(p, (255, 255, 255), 10) for p in band)


def test_a_face_in_a_letterboxed_wide_frame_is_boxed_on_the_face(sample_models):
    wide = np.zeros((512, 760, 3), np.uint8)
    wide[:, 240:752] = astronaut()  # letterboxed into 128x128: bars above and below
    result, seen = look(sample_models["face"], "tflite", wide, PINS["face"]["preprocessing"],
                        PINS["face"]["decoder"])
    [face] = result["detections"]
    straight, _ = look(sample_models["face"], "tflite", astronaut(), PINS["face"]["preprocessing"],
                       PINS["face"]["decoder"])
    x, y, _, h = face["box"]
    sx, sy = straight["detections"][0]["box"][:2]
    # The same face, in the wide frame's coordinates: shifted right by the 240-pixel margin
    # (seen smaller through the letterbox, so its box is a little less sure).
    assert abs(x * 760 - (240 + sx * 512)) < 25 and abs(y * 512 - sy * 512) < 25
    drawn = annotate(result, seen, max_side=380)  # drawn at half size
    assert drawn.shape == (256, 380, 3)
    assert drawn_at(drawn, round(x * 380), round((y + h / 2) * 256), BOX_BGR)


def test_the_selfie_mask_is_blended_over_the_person_and_nowhere_else(sample_models):
    image = astronaut()
    result, seen = look(sample_models["selfie"], "tflite", image, PINS["selfie"]["preprocessing"],
                        PINS["selfie"]["decoder"])
    assert result["coverage"] > 0.3
    mask = cv2.resize(seen.decoder.frame_mask(seen.outputs, seen.placement), (512, 512))
    drawn = annotate(result, seen)
    person, background = mask > 0.9, mask < 0.05
    assert person.mean() > 0.2 and background.mean() > 0.1
    change = np.abs(drawn.astype(int) - image.astype(int)).sum(axis=2)
    # Magenta added over the person: blue and red up or green down, at every pixel.
    assert (change[person] > 20).mean() > 0.99
    assert (drawn[person][:, 1].astype(int) <= image[person][:, 1]).all()
    # The background keeps its colours (tinted by at most 2% where the model is that unsure),
    # but for the outline and the coverage label.
    assert (change[background] <= 3 * 6).mean() > 0.97
    assert detected(result, SinkSettings(kind="snapshot", path=Path("/unused")))
    assert not detected({**result, "coverage": 0.005}, SinkSettings(kind="snapshot", path=Path("/unused")))


def test_a_classifier_shows_its_top_labels_and_counts_as_detected_by_label(tmp_path):
    model = build_colour_classifier(tmp_path)
    red = np.zeros((240, 320, 3), np.uint8)
    red[:, :] = (30, 20, 220)  # BGR
    result, seen = look(model, "openvino", red, {"resize": "stretch", "color": "rgb"},
                        {"type": "classification", "top_k": 2}, COLOURS)
    assert [c["label"] for c in result["classes"]] == ["red", "blue"]
    drawn = annotate(result, seen)
    corner = drawn[:40, :120].reshape(-1, 3)  # two lines of text on black bands, top left
    assert any(near(p, (0, 0, 0), 10) for p in corner) and any(near(p, (255, 255, 255), 10) for p in corner)
    assert np.array_equal(drawn[120:], red[120:])
    snapshot = {"kind": "snapshot", "path": Path("/unused")}
    assert detected(result, SinkSettings(**snapshot))  # red scores 0.86 >= 0.5
    assert detected(result, SinkSettings(**snapshot, labels=["red"]))
    assert not detected(result, SinkSettings(**snapshot, labels=["blue"]))  # blue scores 0.08
    assert not detected(result, SinkSettings(**snapshot, min_score=0.9))


def test_a_jpeg_is_held_to_its_byte_bound_by_quality_then_size():
    rng = np.random.default_rng(7)
    busy = np.clip(cv2.resize(astronaut(), (1600, 1600)).astype(int) + rng.integers(-40, 41, (1600, 1600, 3)),
                   0, 255).astype(np.uint8)  # grain JPEG cannot compress well
    full = encode_jpeg(busy, 95, 16 << 20)
    for bound in (400 << 10, 60 << 10, 16 << 10):
        data = encode_jpeg(busy, 95, bound)
        assert len(data) <= bound < len(full)
        picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] == picture.shape[1] >= 64
    with pytest.raises(ValueError, match="no JPEG of this picture fits in 500 bytes"):
        encode_jpeg(busy, 95, 500)
