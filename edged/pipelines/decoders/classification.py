"""Top-k classes with their labels from a score vector."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edged.errors import InvalidInput
from edged.pipelines.preprocess import Placement


class ClassificationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "classification"
    output: str | None = Field(default=None, description="Output with the scores (default: the first).")
    top_k: int = Field(default=5, ge=1, le=1000, description="How many classes to report.")
    softmax: bool = Field(default=False, description="Scores are logits: apply softmax first.")
    min_score: float = Field(default=0.0, description="Classes scoring below are left out.")


class ClassificationDecoder:
    def __init__(self, config: ClassificationConfig, labels: list[str] | None = None) -> None:
        self.config = config
        self.labels = labels or []

    def decode(self, outputs: dict[str, np.ndarray], placement: Placement, frame_w: int,
               frame_h: int) -> dict:
        name = self.config.output or next(iter(outputs), "")
        if name not in outputs:
            raise InvalidInput(f"classification decoder: no output {name!r}")
        scores = outputs[name].astype(np.float64).reshape(-1)
        if scores.size == 0:
            raise InvalidInput(f"classification decoder: output {name!r} is empty")
        if self.config.softmax:
            shifted = np.exp(scores - scores.max())
            scores = shifted / shifted.sum()
        top = np.argsort(-scores, kind="stable")[: self.config.top_k]
        return {"classes": [
            {"index": int(i), "label": self.labels[i] if i < len(self.labels) else str(int(i)),
             "score": round(float(scores[i]), 6)}
            for i in top if scores[i] >= self.config.min_score
        ]}
