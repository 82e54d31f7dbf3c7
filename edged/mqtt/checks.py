"""The checks a release's version passes before and after activation: loaded on its own
with the selected backend and run on the release's self-test input, then, once served,
the same self-test through the path every request takes. Split from the update agent so
that each fits in a head; both raise UpdateRefused (a version that fails is never kept).
"""

from __future__ import annotations

import numpy as np

from edged.backends.selection import Selection, select
from edged.errors import EdgedError
from edged.models.manager import ModelManager
from edged.models.validation import validate_inputs
from edged.signing import Release


class UpdateRefused(EdgedError):
    """A release that will not be installed; the message is the reason. Trying it again
    would not help (a bad signature, a failing self-test), so it is not retried."""


def self_test_data(manager: ModelManager, release: Release) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    selftest = release.selftest
    directory = manager.store.version_dir(release.manifest.name, release.manifest.version)
    try:
        inputs = np.load(directory / selftest.input, allow_pickle=False)
        with np.load(directory / selftest.expected, allow_pickle=False) as archive:
            expected = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise UpdateRefused(f"self-test files unreadable: {exc}") from None
    return inputs, expected


def check_staged(manager: ModelManager, release: Release) -> Selection:
    """Load the staged version on its own and run the self-test; the backend selection it
    ran on (for the manager to adopt). A failure removes the version."""
    manifest = release.manifest
    store = manager.store
    settings = manager.settings.model(manifest.name)
    directory = store.version_dir(manifest.name, manifest.version)
    try:
        store.verify(manifest.name, manifest.version)
        options = manager.load_options(settings)  # a crash in this load is recorded as any other
        loaded, selection = select(directory / manifest.entry, manifest.format, settings.backend,
                                   options, manager.settings.backends.probe_runs,
                                   attempt=manager.attempts.guard(manifest.name, manifest.version,
                                                                  settings, options))
        try:
            if release.selftest is not None:
                inputs, expected = self_test_data(manager, release)
                checked = validate_inputs({loaded.inputs[0].name: inputs}, loaded.inputs,
                                          reject_non_finite=True)
                check_outputs(loaded.infer(checked), expected, release)
        finally:
            loaded.close()
    except EdgedError as exc:
        store.remove(manifest.name, manifest.version)
        raise UpdateRefused(f"{manifest.version} failed its checks and was removed: {exc}") from None
    return selection


def check_served(manager: ModelManager, release: Release, *, full: bool = False) -> None:
    """The version as served (its backend, its pool): its files still verify (every byte
    when `full`, else as `ModelStore.verify` does within an update) and it passes the
    self-test through `ModelManager.infer`."""
    name, version = release.manifest.name, release.manifest.version
    manager.store.verify(name, version, full=full)
    if release.selftest is not None:
        inputs, expected = self_test_data(manager, release)
        spec = manager.get(name, version).loaded.inputs[0]
        result = manager.infer(name, {spec.name: inputs}, version=version, internal=True)
        check_outputs(result.outputs, expected, release)


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
