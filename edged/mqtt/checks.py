"""The checks a release's version passes before and after activation: loaded on its own
with the selected backend and run on the release's self-test input, then, once served,
the same self-test through the path every request takes. Split from the update agent so
that each fits in a head; both raise UpdateRefused (a version that fails is never kept).
"""

from __future__ import annotations

import time

import numpy as np

from edged.backends.base import LoadedModel
from edged.backends.selection import Selection
from edged.control import Control
from edged.errors import EdgedError
from edged.models.validation import validate_inputs
from edged.signing import Release, verify_envelope

MAX_RELEASE_BYTES = 1 << 20


class UpdateRefused(EdgedError):
    """A release that will not be installed; the message is the reason. Trying it again
    would not help (a bad signature, a failing self-test), so it is not retried. `version`:
    the release's, once it is known (its events and the state's `failure` name it)."""

    def __init__(self, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version


def trusted_release(payload: bytes, trusted: dict, max_bytes: int, name: str, group: str | None,
                    device: str | None) -> Release:
    """The release of an envelope that arrived on the release topic of (`name`, `group`,
    `device`): signed by a pinned key, for that model and exactly that audience (so it
    cannot be replayed to another group or device), not expired."""
    try:
        release = Release.parse(verify_envelope(payload, trusted, max_bytes))
    except EdgedError as exc:
        raise UpdateRefused(str(exc)) from None
    version = release.manifest.version
    if release.manifest.name != name:
        raise UpdateRefused(f"release of {release.manifest.name!r} on the topic of {name!r}", version)
    if release.group != group:
        raise UpdateRefused(f"release signed for group {release.group!r}, received for {group!r}", version)
    if release.device != device:
        raise UpdateRefused(f"release signed for device {release.device!r}, received for {device!r}", version)
    if release.expired(time.time()):
        raise UpdateRefused(f"release {version} expired at {time.ctime(release.expires_at)}", version)
    return release


def check_rollback(release: Release, active: str | None) -> None:
    """A rollback release leaves `rollback_from` only: replayed once another version is
    active (a later rollout completed), it must not send the device back."""
    if release.rollback and active != release.rollback_from:
        raise UpdateRefused(f"rollback from {release.rollback_from}, but {active} is active",
                            release.manifest.version)


def self_test_data(control: Control, release: Release) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    selftest = release.selftest
    name, version = release.manifest.name, release.manifest.version
    try:
        inputs = np.load(control.version_file(name, version, selftest.input), allow_pickle=False)
        with np.load(control.version_file(name, version, selftest.expected), allow_pickle=False) as archive:
            expected = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise UpdateRefused(f"self-test files unreadable: {exc}") from None
    return inputs, expected


def check_staged(control: Control, release: Release) -> Selection:
    """Load the staged version once and run the self-test on that load, which the manager
    then serves once the version is activated; the backend selection it ran on. A failure
    removes the version."""
    manifest = release.manifest

    def self_test(loaded: LoadedModel) -> None:
        inputs, expected = self_test_data(control, release)
        checked = validate_inputs({loaded.inputs[0].name: inputs}, loaded.inputs, reject_non_finite=True)
        check_outputs(loaded.infer(checked), expected, release)

    try:  # a crash in this load is recorded as any other (models/attempts.py)
        return control.trial_load(manifest.name, manifest.version,
                                  self_test if release.selftest is not None else None)
    except EdgedError as exc:
        control.remove(manifest.name, manifest.version)
        raise UpdateRefused(f"{manifest.version} failed its checks and was removed: {exc}") from None


def check_served(control: Control, release: Release, *, full: bool = False) -> None:
    """The version as served (its backend, its pool): its files still verify (every byte
    when `full`, else as `ModelStore.verify` does within an update) and it passes the
    self-test through `ModelManager.infer`."""
    name, version = release.manifest.name, release.manifest.version
    control.verify(name, version, full=full)
    if release.selftest is not None:
        inputs, expected = self_test_data(control, release)
        check_outputs(control.infer_internal(name, version, inputs), expected, release)


def check_outputs(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], release: Release) -> None:
    """Every expected output is there, of the same shape, and within atol + rtol * |expected|."""
    selftest = release.selftest
    for key, want in expected.items():
        got = outputs.get(key)
        if got is None:
            raise UpdateRefused(f"self-test: the model has no output {key!r}")
        if got.shape != want.shape:
            raise UpdateRefused(f"self-test: output {key!r} has shape {got.shape}, expected {want.shape}")
        if not np.allclose(got, want, atol=selftest.atol, rtol=selftest.rtol, equal_nan=False):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise UpdateRefused(f"self-test: output {key!r} differs by up to {worst:.4g} "
                                f"(atol {selftest.atol:g}, rtol {selftest.rtol:g})")
