"""Pictures of what a decoder found, drawn on the frame that produced it, for people to look at.

`edged predict --annotate` and the snapshot sink both draw here: boxes with their scores
and keypoints for detectors, the mask blended over the picture for segmentation, the top
labels for classifiers. Results are in relative frame coordinates (the decoders undo the
resize or letterbox), so they are drawn on the picture at whatever size it is shown. A
segmentation result carries only the mask's coverage and box, so the mask is read again
from the model's outputs (`Seen.outputs`), cut to the frame by the decoder and stretched
over it. Sizes are bounded: the picture is scaled down to `max_side` first, and
`encode_jpeg` lowers the quality, then the size, until the JPEG fits its byte bound.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edged.pipelines.decoders import Decoder
from edged.pipelines.decoders.segmentation import SegmentationDecoder
from edged.pipelines.preprocess import Placement

BOX_BGR = (0, 220, 0)
KEYPOINT_BGR = (0, 0, 255)
MASK_BGR = (255, 0, 255)  # magenta: stands out on skin, sky and foliage alike
TEXT_BGR = (255, 255, 255)
MASK_OPACITY = 0.45  # at a mask value of 1; softer where the model is less sure
MIN_SIDE = 64  # encode_jpeg never scales a picture below this
LOWEST_QUALITY = 40  # below this, a smaller picture looks better than a blockier one


@dataclass(frozen=True)
class Seen:
    """What produced a result: the frame and the model's raw outputs, for drawing it."""

    image: np.ndarray  # BGR uint8, as the source gave it (never drawn on)
    outputs: dict[str, np.ndarray]
    placement: Placement  # where the frame sat in the model's input
    decoder: Decoder | None


def annotate(result: dict, seen: Seen, max_side: int = 1280) -> np.ndarray:
    """A new BGR picture, at most `max_side` pixels on its longer side, with `result` drawn on it."""
    image = _fit(seen.image, max_side)
    if isinstance(seen.decoder, SegmentationDecoder):
        _blend_mask(image, seen.decoder.frame_mask(seen.outputs, seen.placement),
                    seen.decoder.config.threshold)
    lines = []
    if "coverage" in result:
        lines.append(f"coverage {result['coverage']:.0%}")
    for detection in result.get("detections") or ():
        _draw_detection(image, detection)
    lines += [f"{c['label']} {c['score']:.2f}" for c in result.get("classes") or ()]
    _draw_lines(image, lines)
    return image


def encode_jpeg(image: np.ndarray, quality: int, max_bytes: int) -> bytes:
    """The picture as a JPEG of at most `max_bytes`: at `quality`, else at lower qualities
    (down to 40), else scaled down by half until it fits; ValueError when even a
    64-pixel picture does not."""
    import cv2

    while True:
        for attempt in range(quality, LOWEST_QUALITY - 1, -15) if quality > LOWEST_QUALITY else [quality]:
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, attempt])
            if not ok:
                raise ValueError(f"OpenCV could not encode a {image.shape} picture as JPEG")
            if data.size <= max_bytes:
                return data.tobytes()
        if max(image.shape[:2]) // 2 < MIN_SIDE:
            raise ValueError(f"no JPEG of this picture fits in {max_bytes} bytes")
        image = _fit(image, max(image.shape[:2]) // 2)


def _fit(image: np.ndarray, max_side: int) -> np.ndarray:
    """A copy no larger than `max_side` on its longer side (area-averaged, so no aliasing)."""
    import cv2

    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _scale(image: np.ndarray) -> tuple[int, float]:
    """Line thickness and font scale that read the same on a small and a large picture."""
    side = max(image.shape[:2])
    return max(1, round(side / 300)), max(0.4, side / 1400)


def _draw_detection(image: np.ndarray, detection: dict) -> None:
    import cv2

    height, width = image.shape[:2]
    thickness, font = _scale(image)
    x, y, w, h = detection["box"]
    top_left = (round(x * width), round(y * height))
    bottom_right = (round((x + w) * width), round((y + h) * height))
    cv2.rectangle(image, top_left, bottom_right, BOX_BGR, thickness, cv2.LINE_AA)
    for kx, ky in detection.get("keypoints") or ():
        cv2.circle(image, (round(kx * width), round(ky * height)), thickness + 1, KEYPOINT_BGR, -1,
                   cv2.LINE_AA)
    _label(image, f"{detection['score']:.2f}", top_left, BOX_BGR, thickness, font)


def _blend_mask(image: np.ndarray, mask: np.ndarray, threshold: float) -> None:
    """Tint the picture by the mask's values and outline where it passes `threshold`."""
    import cv2

    height, width = image.shape[:2]
    values = np.clip(cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR),
                     0.0, 1.0)
    tint = values * np.float32(MASK_OPACITY)
    # Only where the tint moves a grey level (a person is often a small part of the frame),
    # by OpenCV's per-pixel weighted sum: a tenth of the CPU of the same sum in numpy floats.
    x, y, w, h = cv2.boundingRect((tint >= 1 / 256).astype(np.uint8))
    if w and h:
        box = (slice(y, y + h), slice(x, x + w))
        image[box] = cv2.blendLinear(image[box], _solid(height, width)[box], np.float32(1.0) - tint[box],
                                     tint[box])
    inside = (values > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, MASK_BGR, _scale(image)[0], cv2.LINE_AA)


@functools.lru_cache(maxsize=4)
def _solid(height: int, width: int) -> np.ndarray:
    """A picture all of the mask's colour (a pipeline's frames keep their size: made once)."""
    solid = np.empty((height, width, 3), np.uint8)
    solid[:] = MASK_BGR
    solid.flags.writeable = False
    return solid


def _draw_lines(image: np.ndarray, lines: list[str]) -> None:
    """Text in the top-left corner, one line under the other (a classifier's top labels)."""
    import cv2

    thickness, font = _scale(image)
    y = 0
    for line in lines:
        (_, text_h), baseline = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
        y += text_h + baseline + 2 * thickness
        _label(image, line, (0, y), (0, 0, 0), thickness, font)


def _label(image: np.ndarray, text: str, corner: tuple[int, int], background: tuple[int, int, int],
           thickness: int, font: float) -> None:
    """`text` on a filled band whose bottom-left is at `corner` (kept inside the picture)."""
    import cv2

    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
    pad = thickness + 1
    x = min(max(corner[0], 0), max(image.shape[1] - text_w - 2 * pad, 0))
    y = max(corner[1], text_h + baseline + 2 * pad)
    cv2.rectangle(image, (x, y - text_h - baseline - 2 * pad), (x + text_w + 2 * pad, y), background, -1)
    cv2.putText(image, text, (x + pad, y - baseline - pad), cv2.FONT_HERSHEY_SIMPLEX, font, TEXT_BGR,
                thickness, cv2.LINE_AA)
