"""A segmentation mask: how much of the frame it covers and where, without the pixels.

Results go to files, MQTT and sockets as JSON, so the mask itself is reduced to its
coverage and bounding box in frame coordinates (the letterbox is undone).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edged.errors import InvalidInput
from edged.pipelines.preprocess import Placement


class SegmentationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "segmentation"
    output: str | None = Field(default=None, description="Output with the mask (default: the first).")
    threshold: float = Field(default=0.5, description="Mask values above count as foreground.")


class SegmentationDecoder:
    def __init__(self, config: SegmentationConfig, labels: list[str] | None = None) -> None:
        self.config = config

    def frame_mask(self, outputs: dict[str, np.ndarray], placement: Placement) -> np.ndarray:
        """The mask's values over the frame alone (letterbox bars cut off), at the mask's
        own resolution: stretched to the frame's size, it lies over the frame."""
        name = self.config.output or next(iter(outputs), "")
        if name not in outputs:
            raise InvalidInput(f"segmentation decoder: no output {name!r}")
        mask = np.squeeze(outputs[name])
        if mask.ndim != 2:
            raise InvalidInput(f"segmentation decoder: output {name!r} is not one 2-D mask")
        height, width = mask.shape
        top = round(placement.pad_y * height / placement.input_height)
        left = round(placement.pad_x * width / placement.input_width)
        return mask[top : height - top or None, left : width - left or None]

    def decode(self, outputs: dict[str, np.ndarray], placement: Placement, frame_w: int,
               frame_h: int) -> dict:
        # Only the part of the input that shows the frame counts (not letterbox bars).
        inner = self.frame_mask(outputs, placement) > self.config.threshold
        coverage = float(inner.mean()) if inner.size else 0.0
        result: dict = {"coverage": round(coverage, 5), "box": None}
        if inner.any():
            ys, xs = np.nonzero(inner)
            rows, cols = inner.shape
            x1, y1 = xs.min() / cols, ys.min() / rows
            x2, y2 = (xs.max() + 1) / cols, (ys.max() + 1) / rows
            result["box"] = [round(x1, 5), round(y1, 5), round(x2 - x1, 5), round(y2 - y1, 5)]
        return result
