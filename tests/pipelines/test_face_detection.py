"""BlazeFace decoding agrees with MediaPipe's own face detector on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import image_to_tensor

REFERENCE = json.loads((Path(__file__).parent / "data" / "mediapipe_face_reference.json").read_text())
PREPROCESSING = {"resize": "letterbox", "color": "rgb", "range": [-1.0, 1.0]}


def photo(name: str) -> np.ndarray:
    return cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)


def assert_matches_mediapipe(detections: list[dict], name: str) -> None:
    expected = REFERENCE["images"][name]["faces"]
    assert len(detections) == len(expected)
    for got, want in zip(detections, expected, strict=True):
        assert abs(got["score"] - want["score"]) <= 0.05
        assert np.allclose(got["box"], want["box"], atol=0.02), (got["box"], want["box"])
        assert np.allclose(got["keypoints"], want["keypoints"], atol=0.02)


@pytest.mark.parametrize("backend", ["openvino", "litert"])
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_face_detection_agrees_with_mediapipe(sample_models, backend, name):
    model = get_backend(backend).load(sample_models["face"], "tflite", LoadOptions())
    image = photo(name)
    tensor, placement = image_to_tensor(image, [1, 128, 128, 3], np.float32, PREPROCESSING)
    outputs = model.infer({"input": tensor})
    model.close()
    result = build_decoder({"type": "blazeface"}).decode(outputs, placement, image.shape[1], image.shape[0])
    assert_matches_mediapipe(result["detections"], name)


def test_predict_prints_the_decoded_faces(start_daemon, sample_store, tmp_path):
    daemon = start_daemon(sample_store.root)
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), photo("astronaut"))
    out = subprocess.run(
        [sys.executable, "-m", "edged", "predict", "--socket", str(daemon.socket), "--model", "face",
         "--input", str(path), "--json"], capture_output=True, text=True, timeout=60, check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["model"] == "face" and doc["version"] == "1"
    assert_matches_mediapipe(doc["detections"], "astronaut")
    assert len(doc["detections"][0]["keypoints"]) == 6


def test_letterbox_placement_maps_back_to_the_frame():
    image = np.zeros((100, 200, 3), np.uint8)
    _, placement = image_to_tensor(image, [1, 128, 128, 3], np.float32, PREPROCESSING)
    x, y = placement.to_frame(np.array([0.0, 1.0]), np.array([0.25, 0.75]), 200, 100)
    np.testing.assert_allclose(x, [0, 1], atol=1e-6)
    np.testing.assert_allclose(y, [0, 1], atol=1e-6)


def test_bad_decoder_and_preprocessing_specs_are_named():
    from edged.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"decoder\.type 'yolo' is not one of"):
        build_decoder({"type": "yolo"})
    with pytest.raises(InvalidInput, match=r"decoder\.score_threshold"):
        build_decoder({"type": "blazeface", "score_threshold": 7})
    with pytest.raises(InvalidInput, match=r"preprocessing.*either range or mean/std"):
        image_to_tensor(np.zeros((4, 4, 3), np.uint8), [1, 4, 4, 3], np.float32,
                        {"range": [0, 1], "mean": [0, 0, 0], "std": [1, 1, 1]})


def test_garbage_outputs_give_no_nan_and_no_crash():
    """Outputs are untrusted too: boxes with no area and NaN values never reach a result."""
    from edged.pipelines.preprocess import Placement

    decoder = build_decoder({"type": "blazeface"})
    placement = Placement(0.2, 0.2, 0, 16, 128, 128)
    rng = np.random.default_rng(0)
    for regressors in (rng.normal(0, 40, (1, 896, 16)), np.full((1, 896, 16), np.nan),
                       np.zeros((1, 896, 16))):
        outputs = {"regressors": regressors.astype(np.float32),
                   "classificators": np.full((1, 896, 1), 50.0, np.float32)}
        result = decoder.decode(outputs, placement, 640, 480)
        json.dumps(result, allow_nan=False)  # raises on NaN or Infinity
        for detection in result["detections"]:
            assert detection["box"][2] > 0 and detection["box"][3] > 0
