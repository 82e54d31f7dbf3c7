"""Turns a camera frame (or a sensor window) into a model input tensor.

A frame is prepared as the model manifest's `preprocessing` says (all keys optional):
    resize: "stretch" (default) or "letterbox" (keep the aspect ratio, pad with black)
    color:  "rgb" (default) or "bgr"
    range:  [low, high] that pixel values 0..255 map to (default [0, 1]), or
    mean, std: per-channel lists, applied to 0..255 values as (x - mean) / std
The tensor layout (NHWC or NCHW), size and dtype come from the model's input spec, so
the same frame feeds an OpenVINO IR (often NCHW) and a TFLite model (NHWC). A sensor
window needs no preprocessing: `window_to_tensor` only fits it to the input's shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edged.errors import InvalidInput


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: Literal["stretch", "letterbox"] = Field(
        default="stretch", description="How to fit the input size."
    )
    color: Literal["rgb", "bgr"] = Field(default="rgb", description="Channel order the model expects.")
    range: tuple[float, float] | None = Field(default=None, description="[low, high] for pixels 0..255.")
    mean: tuple[float, ...] | None = Field(default=None, description="Per-channel mean (0..255 scale).")
    std: tuple[float, ...] | None = Field(default=None, description="Per-channel std (0..255 scale).")

    @model_validator(mode="after")
    def _one_normalisation(self) -> Preprocessing:
        if self.range is not None and (self.mean is not None or self.std is not None):
            raise ValueError("give either range or mean/std, not both")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std must not be 0")
        for values in (self.mean, self.std):
            if values is not None and len(values) not in (1, 3):
                raise ValueError("mean and std take 1 or 3 values")
        return self

    @classmethod
    def parse(cls, value: dict | None) -> Preprocessing:
        try:
            return cls.model_validate(value or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "preprocessing"
            raise InvalidInput(f"preprocessing.{where}: {first['msg']}") from None


@dataclass(frozen=True)
class Placement:
    """Where the original frame sits inside the model input, to map results back."""

    scale_x: float  # input pixels per frame pixel
    scale_y: float
    pad_x: float  # input pixels of padding on the left / top
    pad_y: float
    input_width: int
    input_height: int

    def to_frame(self, x: np.ndarray, y: np.ndarray, frame_w: int, frame_h: int) -> tuple:
        """Relative input coordinates -> relative frame coordinates."""
        fx = (x * self.input_width - self.pad_x) / self.scale_x / frame_w
        fy = (y * self.input_height - self.pad_y) / self.scale_y / frame_h
        return fx, fy


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 image, or InvalidInput saying why not."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InvalidInput(f"{path}: not a readable image")
    return image


def input_size(shape: list[int] | tuple[int, ...]) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels_first) of a 4-D image input with 1 or 3 channels."""
    if len(shape) != 4:
        raise InvalidInput(f"model input has shape {list(shape)}; an image needs a 4-D input")
    channels_first = shape[1] in (1, 3) and shape[3] not in (1, 3)
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    channels = shape[1] if channels_first else shape[3]
    if channels not in (1, 3):
        raise InvalidInput(f"model input {list(shape)} is not a 1- or 3-channel image")
    if height <= 0 or width <= 0:
        raise InvalidInput(f"model input {list(shape)} has no fixed size to resize to")
    return height, width, channels, channels_first


def image_to_tensor(
    image_bgr: np.ndarray, shape: list[int] | tuple[int, ...], dtype: np.dtype,
    preprocessing: Preprocessing | dict | None,
) -> tuple[np.ndarray, Placement]:
    import cv2

    prep = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.parse(preprocessing)
    height, width, channels, channels_first = input_size(shape)
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.uint8:
        raise InvalidInput(f"an image becomes a float or uint8 tensor, not {dtype}")
    frame_h, frame_w = image_bgr.shape[:2]
    if prep.resize == "letterbox":
        scale = min(width / frame_w, height / frame_h)
        new_w, new_h = round(frame_w * scale), round(frame_h * scale)
        pad_x, pad_y = (width - new_w) / 2, (height - new_h) / 2
        canvas = np.zeros((height, width, 3), np.uint8)
        left, top = int(pad_x), int(pad_y)
        canvas[top : top + new_h, left : left + new_w] = cv2.resize(
            image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR
        )
        image = canvas
        placement = Placement(new_w / frame_w, new_h / frame_h, left, top, width, height)
    else:
        image = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_LINEAR)
        placement = Placement(width / frame_w, height / frame_h, 0.0, 0.0, width, height)
    if channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, np.newaxis]
    elif prep.color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if dtype.kind == "f":
        if prep.mean is not None and prep.std is not None:
            tensor = (image.astype(np.float32) - np.float32(prep.mean)) / np.float32(prep.std)
        else:
            low, high = prep.range or (0.0, 1.0)
            tensor = image.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low)
    else:
        tensor = image
    tensor = tensor[np.newaxis]
    if channels_first:
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor, dtype=dtype), placement


def window_to_tensor(window: np.ndarray, shape: list[int] | tuple[int, ...],
                     dtype: np.dtype) -> tuple[np.ndarray, Placement]:
    """A sensor window [N samples, C channels] as the model input: the same values, reshaped.

    Any input shape with N * C elements fits ([1, N, C], [1, N * C], ...; one dynamic
    dimension is worked out). An input laid out as [.., C, .., N] (channels first) gets the
    window transposed. The placement only records N and C: sensor results have no pixels.
    """
    samples, channels = window.shape
    target = list(shape)
    dynamic = [i for i, d in enumerate(target) if d < 0]
    fixed = int(np.prod([d for d in target if d >= 0]))
    if len(dynamic) == 1 and fixed and window.size % fixed == 0:
        target[dynamic[0]] = window.size // fixed
    if len(dynamic) > 1 or int(np.prod(target)) != window.size:
        raise InvalidInput(f"a window of {samples} samples x {channels} channels does not fit model "
                           f"input {list(shape)}; set source.window and source.channels to match")
    if channels != samples and [d for d in target if d != 1] == [channels, samples]:
        window = window.T
    tensor = np.ascontiguousarray(window.reshape(target), dtype=dtype)
    return tensor, Placement(1.0, 1.0, 0.0, 0.0, samples, channels)
