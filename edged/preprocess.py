"""Turns an image into a model input tensor, as the model's manifest describes.

Manifest `preprocessing` keys used here: `range` ([low, high] that pixel
values 0..255 map to; default [0, 1]) and `color` ("rgb" default, or "bgr").
The tensor layout (NHWC or NCHW) and size come from the model's input spec.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edged.errors import InvalidInput


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 image, or InvalidInput saying why not."""
    import cv2  # imported here: the daemon's serving path never needs OpenCV

    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InvalidInput(f"{path}: not a readable image")
    return image


def image_to_tensor(
    image_bgr: np.ndarray, shape: list[int], dtype: np.dtype, preprocessing: dict | None
) -> np.ndarray:
    import cv2

    prep = preprocessing or {}
    if len(shape) != 4:
        raise InvalidInput(f"model input has shape {shape}; an image needs a 4-D input")
    channels_first = shape[1] in (1, 3) and shape[3] not in (1, 3)
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    if height <= 0 or width <= 0:
        raise InvalidInput(f"model input {shape} has no fixed size to resize to")
    image = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)
    if prep.get("color", "rgb") == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if np.dtype(dtype).kind == "f":
        low, high = prep.get("range", [0.0, 1.0])
        tensor = image.astype(np.float32) * ((high - low) / 255.0) + low
    else:
        tensor = image
    tensor = tensor[np.newaxis]
    if channels_first:
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor, dtype=dtype)
