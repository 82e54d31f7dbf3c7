"""Domain errors shared by the core and every transport.

The core raises these; only the transports map them to HTTP codes, MQTT
replies or exit codes, so the core never knows who is asking.
"""


class EdgedError(Exception):
    """Base of every error edged reports to a caller in one line."""


class InvalidInput(EdgedError):
    """A request, tensor, manifest or file that does not meet its contract."""


class InputRejected(InvalidInput):
    """The model itself refused inputs that passed validation (a Reshape given an impossible
    shape, an index out of range): the runtime failed on them twice while it still runs a
    known-good input, so the caller must change the inputs, and the backend is not to blame."""


class ModelNotFound(EdgedError):
    def __init__(self, name: str, version: str | None = None, detail: str = "") -> None:
        what = f"model {name!r}" if version is None else f"version {version!r} of model {name!r}"
        super().__init__(f"{what} not found{': ' + detail if detail else ''}")
        self.name = name
        self.version = version


class ModelUnavailable(EdgedError):
    """The model exists but cannot serve now (loading, failed, or no backend)."""


class BackendError(EdgedError):
    """A backend failed to load or run a model."""


class StoreError(EdgedError):
    """The model store refused an operation or holds inconsistent data."""


class Busy(EdgedError):
    """Too many requests are waiting; the caller should retry later."""


class Forbidden(EdgedError):
    """The caller's credentials do not allow this."""


class OutboxError(EdgedError):
    """The MQTT outbox refused a message or cannot use its file."""
