"""After a runtime error: was it the request's inputs or the runtime?

The answer decides what the caller hears and what the daemon does. Inputs the model
refuses (a Reshape told to make 5 rows of 12 values) are the caller's to fix: a client
error (`InputRejected`, HTTP 400) that must not count against the backend, or any client
could push a model off its fastest backend. A runtime that no longer runs at all is
the daemon's problem: a server error (`BackendError`, HTTP 500) that counts towards the
runtime fallback.

The test is made on the runtime, not on the error's text (which differs between
runtimes and versions). The runtime that raised has already been replaced (see
`WarmPool`), so:
1. the same inputs run once more on a runtime that has not failed: if they work, the
   fault was that runtime's, and the caller gets outputs computed from its own inputs;
2. if they fail again, the probe input the model ran at load (`probe_input`, the same
   seed) runs: if that works, the runtime is sound and the inputs are at fault;
   otherwise the runtime is broken.
A bad request thus costs two failed runs and one probe; a good one costs nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from edged.backends.base import LoadedModel, first_line
from edged.backends.selection import probe_input
from edged.errors import BackendError, InputRejected

log = logging.getLogger(__name__)


def run_checked(model: LoadedModel, inputs: dict[str, np.ndarray], label: str,
                into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`model.infer(inputs, into)`; on an error, InputRejected or BackendError whose message
    is the runtime's reason in one line.

    `label` names the model in the log ("tiny 1 on openvino").
    """
    try:
        return model.infer(inputs, into)
    except Exception as exc:
        log.debug("%s: inference failed, trying the inputs on a fresh runtime: %s", label, exc)
    try:
        outputs = model.infer(inputs, into)
    except Exception as exc:
        reason = first_line(exc)
        log.debug("%s: inference failed again; full error:\n%s", label, exc)
        if _runs_probe(model, label):
            raise InputRejected(reason) from exc
        raise BackendError(reason) from exc
    log.warning("%s: a runtime failed once and was replaced; the request ran on another", label)
    return outputs


def _runs_probe(model: LoadedModel, label: str) -> bool:
    """True if the model still runs the input it ran when it was loaded."""
    try:
        model.infer(probe_input(model.inputs))
    except Exception as exc:
        log.debug("%s: the load-time probe input fails too: %s", label, exc)
        return False
    return True
