"""Classification and segmentation decoders on real model outputs and on known arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.errors import InvalidInput
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import image_to_tensor

STRETCH = {"resize": "stretch", "range": [0.0, 1.0]}


def test_classification_top_k_with_labels():
    decoder = build_decoder({"type": "classification", "top_k": 2, "softmax": True}, ["cat", "dog", "owl"])
    _, placement = image_to_tensor(np.zeros((4, 4, 3), np.uint8), [1, 4, 4, 3], np.float32, None)
    result = decoder.decode({"logits": np.array([[0.1, 3.0, 1.0]], np.float32)}, placement, 4, 4)
    assert [c["label"] for c in result["classes"]] == ["dog", "owl"]
    assert result["classes"][0]["index"] == 1
    assert 0.8 < result["classes"][0]["score"] < 0.9
    unlabelled = build_decoder({"type": "classification", "top_k": 1})
    assert unlabelled.decode({"p": np.array([0.2, 0.7])}, placement, 4, 4)["classes"][0]["label"] == "1"


def test_selfie_segmentation_finds_the_person(sample_models):
    """The real selfie model on the astronaut photo: a person fills much of it, coffee has none."""
    model = get_backend("litert").load(sample_models["selfie"], "tflite", LoadOptions())
    decoder = build_decoder({"type": "segmentation"})
    found = {}
    for name in ("astronaut", "coffee"):
        image = cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)
        tensor, placement = image_to_tensor(image, [1, 256, 256, 3], np.float32, STRETCH)
        found[name] = decoder.decode(model.infer({"input_1": tensor}), placement, image.shape[1],
                                     image.shape[0])
    model.close()
    assert found["astronaut"]["coverage"] > 0.2
    x, y, w, h = found["astronaut"]["box"]
    assert 0 <= x < 0.5 and 0 <= y < 0.3 and w > 0.3 and h > 0.5
    assert found["coffee"]["coverage"] < found["astronaut"]["coverage"] / 2


def test_segmentation_ignores_letterbox_bars():
    decoder = build_decoder({"type": "segmentation"})
    image = np.zeros((50, 100, 3), np.uint8)  # letterboxed into 100x100: bars of 25 rows
    _, placement = image_to_tensor(image, [1, 100, 100, 3], np.float32, {"resize": "letterbox"})
    mask = np.zeros((1, 100, 100, 1), np.float32)
    mask[0, 25:75, 0:50] = 1.0  # the left half of the frame itself
    result = decoder.decode({"m": mask}, placement, 100, 50)
    assert result["coverage"] == pytest.approx(0.5)
    assert result["box"] == [0.0, 0.0, 0.5, 1.0]


def test_decoder_misfits_are_named():
    decoder = build_decoder({"type": "segmentation", "output": "mask"})
    _, placement = image_to_tensor(np.zeros((4, 4, 3), np.uint8), [1, 4, 4, 3], np.float32, None)
    with pytest.raises(InvalidInput, match="no output 'mask'"):
        decoder.decode({"other": np.zeros((1, 4, 4, 1))}, placement, 4, 4)
    with pytest.raises(InvalidInput, match="not one 2-D mask"):
        build_decoder({"type": "segmentation"}).decode({"m": np.zeros((2, 4, 4))}, placement, 4, 4)
