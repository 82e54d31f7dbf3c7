"""Turn a model's raw output tensors into results a person or a fleet can use.

A model's manifest names its decoder (`decoder = {"type": "blazeface", ...}`);
the type chooses from this closed table, never an import path.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from pydantic import ValidationError

from edged.errors import InvalidInput
from edged.pipelines.decoders.blazeface import BlazeFaceConfig, BlazeFaceDecoder
from edged.pipelines.decoders.classification import ClassificationConfig, ClassificationDecoder
from edged.pipelines.decoders.segmentation import SegmentationConfig, SegmentationDecoder
from edged.pipelines.preprocess import Placement


class Decoder(Protocol):
    def decode(self, outputs: dict[str, np.ndarray], placement: Placement, frame_w: int,
               frame_h: int) -> dict: ...


DECODERS: dict[str, tuple[type, type]] = {
    "blazeface": (BlazeFaceConfig, BlazeFaceDecoder),
    "classification": (ClassificationConfig, ClassificationDecoder),
    "segmentation": (SegmentationConfig, SegmentationDecoder),
}
# Decoders that never look at pixels, so they also read the results of a sensor window.
WINDOW_DECODERS = {"classification"}


def build_decoder(spec: dict | None, labels: list[str] | None = None,
                  windows: bool = False) -> Decoder | None:
    """The decoder a manifest asks for (None for raw tensors); InvalidInput if it is wrong,
    or if it reads images and the model sees sensor `windows`."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind not in DECODERS:
        raise InvalidInput(f"decoder.type {kind!r} is not one of {sorted(DECODERS)}")
    if windows and kind not in WINDOW_DECODERS:
        raise InvalidInput(f"decoder.type {kind!r} reads images; a sensor pipeline takes "
                           f"{' or '.join(sorted(WINDOW_DECODERS))}, or none for the raw outputs")
    config_class, decoder_class = DECODERS[kind]
    try:
        config = config_class.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"decoder.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return decoder_class(config, labels)
