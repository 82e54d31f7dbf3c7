"""How pipelines use OpenCV: on the calling threads, quietly, and always in BGR."""

from __future__ import annotations

import os

import numpy as np


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Grey, grey-with-one-channel and BGRA frames become the BGR the rest expects."""
    import cv2

    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def setup_opencv() -> None:
    """OpenCV runs each call on the thread that makes it, and keeps its own log to itself.

    Threads: a pipeline's OpenCV calls (colour conversion, resizing a frame) take tens of
    microseconds, too little to share out; OpenCV's pool workers then spin waiting
    for work on the cores the model runs on (measured on 2 cores: 0.4 ms of CPU per
    frame, 240 yields, and a slower inference). FFmpeg's video decoding keeps its threads.

    Log: OpenCV writes its warnings (`[ WARN:0@1.2] global cap_v4l.cpp ...`) straight to
    stderr, outside edged's log format and levels, once per attempt while a camera is
    away. The sources report the same problems in edged's own lines ("cannot open ...",
    "stopped delivering frames"), once per change. Process-wide; `OPENCV_LOG_LEVEL`,
    when set, wins. (Not set here: the environment is the user's, and children inherit it.)
    """
    import cv2

    cv2.setNumThreads(1)
    if "OPENCV_LOG_LEVEL" not in os.environ:  # `OPENCV_LOG_LEVEL=INFO edged run` shows them again
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
