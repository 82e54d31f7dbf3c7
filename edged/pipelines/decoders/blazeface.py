"""SSD-style anchor decoding with weighted non-maximum suppression, as MediaPipe's
BlazeFace graph does it (SsdAnchorsCalculator, TensorsToDetectionsCalculator,
NonMaxSuppressionCalculator with the WEIGHTED algorithm).

The defaults are the configuration of `face_detection_short_range.tflite`:
896 anchors from strides 8, 16, 16, 16 on a 128x128 input, 16 values per box
(centre, size, 6 keypoints), sigmoid scores clipped at +-100.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edged.errors import InvalidInput
from edged.pipelines.preprocess import Placement


class BlazeFaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "blazeface"
    boxes_output: str = Field(default="regressors", description="Output with box and keypoint offsets.")
    scores_output: str = Field(default="classificators", description="Output with one logit per anchor.")
    strides: tuple[Annotated[int, Field(ge=1, le=4096)], ...] = Field(
        default=(8, 16, 16, 16), min_length=1, max_length=16, description="Feature map stride per layer."
    )
    anchors_per_layer: int = Field(default=2, ge=1, description="Anchors each layer adds per cell.")
    anchor_offset: float = Field(default=0.5, description="Anchor centre within its cell.")
    num_keypoints: int = Field(default=6, ge=1, le=64, description="Keypoints after the 4 box values.")
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Detections below are dropped.")
    score_clip: float = Field(default=100.0, gt=0, description="Logits are clipped to +-this.")
    nms_threshold: float = Field(default=0.3, ge=0, le=1, description="IoU above which boxes merge.")
    max_detections: int = Field(default=100, ge=1, le=10_000, description="Detections kept at most.")


def ssd_anchor_centres(width: int, height: int, strides: tuple[int, ...], per_layer: int,
                       offset: float) -> np.ndarray:
    """(N, 2) relative anchor centres; consecutive layers with one stride share their cells."""
    centres = []
    layer = 0
    while layer < len(strides):
        stride = strides[layer]
        repeats = 0
        while layer < len(strides) and strides[layer] == stride:
            repeats += per_layer
            layer += 1
        rows, cols = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid((np.arange(rows) + offset) / rows, (np.arange(cols) + offset) / cols,
                             indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, area: float, boxes: np.ndarray, areas: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, threshold: float,
                 limit: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Merge overlapping candidates into their score-weighted mean; keep the top score."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    while order.size and len(kept) < limit:
        best = order[0]
        overlap = _iou(boxes[best], areas[best], boxes[order], areas[order])
        overlap[0] = 1.0  # a box always belongs to its own group
        group = order[overlap > threshold]
        weights = scores[group][:, None]
        total = weights.sum()
        box = (boxes[group] * weights).sum(0) / total
        points = (keypoints[group] * weights[:, :, None]).sum(0) / total
        kept.append((float(scores[best]), box, points))
        order = order[overlap <= threshold]
    return kept


def _logit_floor(threshold: float, clip: float) -> float | None:
    """The raw logit at or above which a score (sigmoid of the clipped logit) may reach
    `threshold`: -inf keeps every number, None keeps nothing."""
    if threshold >= 1.0:
        return None
    if threshold <= 0.0:
        return -np.inf
    floor = float(np.log(threshold / (1.0 - threshold))) - 1e-9
    if floor > clip:
        return None  # no clipped logit gets there
    return -np.inf if floor <= -clip else floor  # within (-clip, clip], clipping changes no comparison


class BlazeFaceDecoder:
    def __init__(self, config: BlazeFaceConfig, labels: list[str] | None = None) -> None:
        self.config = config  # one class (a face): labels are not used
        self._anchors: dict[tuple[int, int], np.ndarray] = {}
        self._floor = _logit_floor(config.score_threshold, config.score_clip)

    def anchors(self, width: int, height: int) -> np.ndarray:
        key = (width, height)
        if key not in self._anchors:
            c = self.config
            self._anchors[key] = ssd_anchor_centres(width, height, c.strides, c.anchors_per_layer,
                                                    c.anchor_offset)
        return self._anchors[key]

    def decode(self, outputs: dict[str, np.ndarray], placement: Placement, frame_w: int,
               frame_h: int) -> dict:
        c = self.config
        try:
            raw = outputs[c.boxes_output].reshape(-1, 4 + 2 * c.num_keypoints)
            logits = outputs[c.scores_output].reshape(-1)
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"blazeface decoder: outputs do not fit its config ({exc})") from None
        anchors = self.anchors(placement.input_width, placement.input_height)
        if len(anchors) != len(raw) or len(raw) != len(logits):
            raise InvalidInput(f"blazeface decoder: {len(raw)} boxes for {len(anchors)} anchors")
        if self._floor is None:
            return {"detections": []}
        # Threshold in logit space first: everything after runs on the few candidates only.
        index = np.flatnonzero(logits >= self._floor)
        if index.size == 0:
            return {"detections": []}
        clipped = np.maximum(np.minimum(logits[index], c.score_clip), -c.score_clip)
        scores = 1.0 / (1.0 + np.exp(-clipped.astype(np.float64)))
        exact = scores >= c.score_threshold
        index, scores = index[exact], scores[exact]
        raw = raw[index].astype(np.float64)
        anchors = anchors[index]
        size = np.array([placement.input_width, placement.input_height], np.float64)
        centre = raw[:, 0:2] / size + anchors
        half = raw[:, 2:4] / size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        points = raw[:, 4:].reshape(-1, c.num_keypoints, 2) / size + anchors[:, None, :]
        # A box with no area or a non-finite value cannot be merged or reported: drop it.
        sane = (half > 0).all(axis=1) & np.isfinite(boxes).all(axis=1) & np.isfinite(points).all(axis=(1, 2))
        if not sane.all():
            boxes, points, scores = boxes[sane], points[sane], scores[sane]
        kept = weighted_nms(scores, boxes, points, c.nms_threshold, c.max_detections)
        if not kept:
            return {"detections": []}
        # Every kept detection's two corners and keypoints, mapped back to the frame at once.
        corners = np.array([np.concatenate([box, kps.reshape(-1)]) for _, box, kps in kept])
        xs, ys = placement.to_frame(corners[:, 0::2], corners[:, 1::2], frame_w, frame_h)
        detections = []
        for (score, _, _), x, y in zip(kept, xs.tolist(), ys.tolist(), strict=True):
            detections.append({
                "score": round(score, 5),
                "box": [round(x[0], 5), round(y[0], 5), round(x[1] - x[0], 5), round(y[1] - y[0], 5)],
                "keypoints": [[round(kx, 5), round(ky, 5)] for kx, ky in zip(x[2:], y[2:], strict=True)],
            })
        return {"detections": detections}
