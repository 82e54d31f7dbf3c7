"""The self-test a release carries: an input and the outputs the registry computed for it.

The registry runs the model with edged's own backends in f32 (OpenVINO for IR and ONNX,
LiteRT, else OpenVINO, for TFLite), so a device that loads the version and gets the same
outputs within tolerance knows the files, the runtime and the CPU agree.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from edged.errors import BackendError, InvalidInput

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
INPUT_FILE = "selftest-input.npy"
EXPECTED_FILE = "selftest-expected.npz"
MAX_INPUT_BYTES = 256 << 20
NPY_MAGIC = b"\x93NUMPY"
# The backends tried for each format, in order; the first that loads the model runs it.
RUNNERS: dict[str, list[str]] = {"tflite": ["litert", "openvino"], "openvino": ["openvino"],
                                 "onnx": ["openvino"]}


def read_input(path: Path) -> np.ndarray:
    """A plain .npy array (no pickles), or InvalidInput saying why not."""
    import numpy as np  # here, not at the top: every other command starts faster without it
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InvalidInput(f"{path}: a self-test input is at most {MAX_INPUT_BYTES} bytes")
        with path.open("rb") as f:
            if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise InvalidInput(f"{path}: not a .npy file (np.save writes one)")
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not a .npy array: {str(exc).splitlines()[0]}") from None
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{path}: holds several arrays; give one .npy for the first input")
    return array


def compute_expected(entry: Path, model_format: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """Run `array` through the model at `entry` (an IR's .bin beside it); its outputs by name."""
    import numpy as np

    from edged.backends import LoadOptions, get_backend
    from edged.models.validation import validate_inputs

    reasons = []
    for backend_name in RUNNERS[model_format]:
        try:
            model = get_backend(backend_name).load(entry, model_format,
                                                  LoadOptions(precision="f32", workers=1))
        except BackendError as exc:
            reasons.append(str(exc))
            continue
        try:
            if len(model.inputs) != 1:
                raise InvalidInput(f"the self-test feeds one input; {entry.name} takes {len(model.inputs)}")
            first = model.inputs[0]
            inputs = validate_inputs({first.name: array}, model.inputs, reject_non_finite=True)
            outputs = model.infer(inputs)
        finally:
            model.close()
        for name, value in outputs.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InvalidInput(f"output {name!r} holds NaN or Infinity for this self-test input")
        log.info("self-test outputs computed with %s", backend_name)
        return outputs
    raise BackendError(f"no backend can run {entry.name} for the self-test: {'; '.join(reasons)}")


def write_self_test(directory: Path, entry: Path, model_format: str, input_path: Path) -> list[Path]:
    """Write INPUT_FILE and EXPECTED_FILE into `directory`; returns both paths."""
    import numpy as np
    array = read_input(input_path)
    outputs = compute_expected(entry, model_format, array)
    input_file, expected_file = directory / INPUT_FILE, directory / EXPECTED_FILE
    np.save(input_file, array, allow_pickle=False)
    write_npz(expected_file, outputs)
    return [input_file, expected_file]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz as numpy reads it, with fixed timestamps: the same outputs give
    the same bytes (np.savez would also trip on an output called `file`)."""
    import numpy as np
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
