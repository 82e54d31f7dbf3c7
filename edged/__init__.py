"""edged: an inference daemon for edge devices."""

import sys

__version__ = "0.1.0"

# A daemon never phones home. `import openvino` initialises OpenVINO's telemetry
# (the openvino-telemetry package): with no consent file it counts as consent, writes
# ~/intel/openvino_ga_cid and usage counts, and sends an "import" event. Every use of it
# in openvino is `try: import openvino_telemetry except ImportError:` a no-op stub, so
# making it unimportable here, before any part of edged imports openvino, turns it off
# for the whole process without touching the home directory or the environment.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
