"""The control service on a real store, a real manager and a real (tiny OpenVINO) model:
activate / rollback say whether the version serves, and an update's trial load is the very
load that serves once activated (loaded and probed once, not twice)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edged.backends.base import LoadedModel
from edged.config import load_settings
from edged.control import Control, ControlError, NotServing
from edged.errors import EdgedError
from edged.models.lifecycle import ModelEvents
from edged.models.manager import ModelManager
from edged.mqtt.install import Installer
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox
from edged.mqtt.transfer import Transfer
from edged.signing import Release
from tests.conftest import build_tiny_ir, ir_files

X = np.array([[1, 2, -3, 0.5]], np.float32)


@pytest.fixture
def events() -> list[str]:
    """The kinds of event the manager told its hooks, in order."""
    return []


@pytest.fixture
def control(tiny_store, tmp_path, events):
    settings = load_settings(None, store={"path": str(tiny_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")})
    manager = ModelManager(tiny_store, settings, ModelEvents.each(lambda e: events.append(e.kind)))
    manager.load_all()
    yield Control(manager)
    manager.close()


def stage(control: Control, tmp_path, version: str, scale: float) -> None:
    xml = build_tiny_ir(tmp_path / f"ir-{version}", scale=scale)
    control.store.add("tiny", ir_files(xml), version)


def test_a_trial_load_is_the_load_that_serves_once_activated(control, tmp_path):
    stage(control, tmp_path, "2", scale=3.0)
    tested: list[LoadedModel] = []

    def self_test(loaded: LoadedModel) -> None:
        tested.append(loaded)
        assert np.allclose(loaded.infer({"x": X})["y"], np.maximum(3 * X + 1, 0))

    selection = control.trial_load("tiny", "2", self_test)
    assert control.active("tiny") == "1"  # tested, not yet active
    assert control.manager.served()["tiny"].version == "1"
    serving = control.activate("tiny", "2")
    assert serving.as_dict() == {"model": "tiny", "version": "2", "backend": selection.backend}
    served = control.manager.served()["tiny"]
    assert served.loaded is tested[0]  # not loaded a second time
    assert served.selection.reason.endswith(", when its update was tested")
    assert np.allclose(control.manager.infer("tiny", {"x": X}).outputs["y"], np.maximum(3 * X + 1, 0))


def test_a_failing_self_test_closes_its_load_and_adopts_nothing(control, tmp_path):
    stage(control, tmp_path, "2", scale=3.0)
    tested: list[LoadedModel] = []

    def failing(loaded: LoadedModel) -> None:
        tested.append(loaded)
        raise ControlError("outputs differ")

    with pytest.raises(ControlError, match="outputs differ"):
        control.trial_load("tiny", "2", failing)
    control.activate("tiny", "2")  # loaded afresh
    assert control.manager.served()["tiny"].loaded is not tested[0]


def test_adopting_another_version_closes_the_earlier_load(control, tmp_path):
    stage(control, tmp_path, "2", scale=3.0)
    stage(control, tmp_path, "3", scale=4.0)
    first: list[LoadedModel] = []
    second: list[LoadedModel] = []
    control.trial_load("tiny", "2", first.append)
    control.trial_load("tiny", "3", second.append)
    assert first[0]._compiled is None  # type: ignore[attr-defined]  # OpenVINOModel.close() ran
    assert control.activate("tiny", "3").version == "3"
    assert control.manager.served()["tiny"].loaded is second[0]
    control.activate("tiny", "2")  # its trial load is gone: loaded afresh
    assert control.manager.served()["tiny"].loaded is not first[0]


def test_activate_and_rollback_say_what_serves_or_why_not(control, events, tmp_path):
    with pytest.raises(ControlError, match=r"^tiny has no version '9' in the store$"):
        control.activate("tiny", "9")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    control.store.add("tiny", [garbage], "2")
    refused = r"^tiny 2 is active in the store but not serving: tiny 2: "
    with pytest.raises(NotServing, match=refused) as caught:
        control.activate("tiny", "2")
    assert (caught.value.version, control.active("tiny")) == ("2", "2")
    assert control.manager.served()["tiny"].version == "1"  # the old version keeps serving
    assert control.rollback("tiny").version == "1"
    assert "error" not in control.manager.status()["tiny"]
    assert events == ["model_loaded", "model_failed"]  # 1 never stopped serving: nothing to load


def test_remove_and_prune_keep_the_active_version_and_the_rollback_target(control, tmp_path):
    for version, scale in (("2", 3.0), ("3", 4.0), ("4", 5.0)):
        stage(control, tmp_path, version, scale)
    control.activate("tiny", "3")
    control.activate("tiny", "4")
    with pytest.raises(EdgedError, match="is active"):
        control.remove("tiny", "4")
    assert list(control.prune("tiny", keep_versions=2)) == ["2", "1"]
    assert control.models() == {"tiny": {"versions": ["3", "4"], "active": "4"}}


# --- a trial load never outlives its version (issue 12 review) ---------------------------

ONES = np.ones((1, 4), np.float32)


def adopted_load(control: Control) -> LoadedModel | None:
    """The trial load the manager holds, waiting for its version's activation."""
    adopted = control.manager._states["tiny"].adopted
    return adopted.loaded if adopted is not None else None


def is_closed(loaded: LoadedModel) -> bool:
    return loaded._compiled is None  # type: ignore[attr-defined]  # OpenVINOModel.close() ran


def test_a_version_removed_and_added_again_with_other_files_serves_the_new_files(control, tmp_path):
    stage(control, tmp_path, "2", scale=100.0)
    tested: list[LoadedModel] = []
    control.trial_load("tiny", "2", tested.append)  # an update's trial load, then the update fails
    control.remove("tiny", "2")
    xml = build_tiny_ir(tmp_path / "ir-2-again", scale=5.0)  # another model, the same version string
    control.store.add("tiny", ir_files(xml), "2")
    assert control.activate("tiny", "2").version == "2"
    served = control.manager.served()["tiny"]
    assert served.loaded is not tested[0] and is_closed(tested[0])
    assert not served.selection.reason.endswith("when its update was tested")
    assert np.allclose(control.manager.infer("tiny", {"x": ONES}).outputs["y"], 6.0)  # not 101
    assert adopted_load(control) is None


def test_a_sync_closes_the_trial_load_of_a_version_removed_since(control, tmp_path):
    stage(control, tmp_path, "2", scale=3.0)
    tested: list[LoadedModel] = []
    control.trial_load("tiny", "2", tested.append)
    control.manager.sync()
    assert adopted_load(control) is tested[0]  # still in the store: kept for its activation
    control.remove("tiny", "2")
    control.manager.sync()
    assert adopted_load(control) is None and is_closed(tested[0])


def test_a_retry_after_fallback_of_the_served_version_keeps_another_versions_trial_load(control, tmp_path):
    stage(control, tmp_path, "2", scale=3.0)
    tested: list[LoadedModel] = []
    control.trial_load("tiny", "2", tested.append)
    served = control.manager.served()["tiny"]
    served.retry_at = time.monotonic()  # as a fallback leaves it: 1 is probed again at this sync
    control.manager.sync()
    reloaded = control.manager.served()["tiny"]
    assert reloaded is not served and reloaded.version == "1" and reloaded.retry_at is None
    assert adopted_load(control) is tested[0] and not is_closed(tested[0])
    control.activate("tiny", "2")
    assert control.manager.served()["tiny"].loaded is tested[0]


def test_an_install_that_fails_after_its_trial_load_leaves_no_load_behind(control, tmp_path):
    """The release is staged already (as after a restart), so no byte is fetched; the
    version's file is damaged between the trial load and the activation, which refuses it."""
    stage(control, tmp_path, "2", scale=3.0)
    settings = load_settings(None, mqtt={"enabled": True, "device_id": "cam-1",
                                         "outbox_path": str(tmp_path / "outbox.db")},
                             updates={"download_dir": str(tmp_path / "downloads")})
    outbox = Outbox(settings.mqtt.outbox_path)
    transfer = Transfer(MqttLink(settings.mqtt, outbox), tmp_path / "downloads", chunk_bytes=65536,
                        window=2, timeout_s=1.0, retries=0)
    manifest = control.store.manifest("tiny", "2")
    now = time.time()
    release = Release.parse({"manifest": manifest.model_dump(), "group": None, "published_at": now,
                             "expires_at": now + 3600, "selftest": None})
    trial: list[LoadedModel] = []

    def event(kind: str, **fields: object) -> int:
        if kind == "update_tested":
            trial.append(adopted_load(control))
            weights = control.version_file("tiny", "2", manifest.files[-1].name)
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))  # same size, other bytes
        return 0

    installer = Installer(settings.updates, control, transfer, threading.Event(), event)
    try:
        with pytest.raises(EdgedError, match="does not match its sha256"):
            installer.install(release)
    finally:
        outbox.close()
    assert trial[0] is not None and is_closed(trial[0])
    assert adopted_load(control) is None
    assert control.active("tiny") == "1" and control.manager.served()["tiny"].version == "1"


def test_a_version_added_again_at_once_with_other_weights_is_compiled_afresh(control, tmp_path):
    """OpenVINO's compiled-model cache tells models apart by path, size and mtime in seconds:
    the same version added again within the second, with other weights in a same-size file,
    must not be served from the old compile (the cache is kept per content)."""
    stage(control, tmp_path, "2", scale=100.0)
    control.activate("tiny", "2")  # compiled, and cached
    control.activate("tiny", "1")
    control.remove("tiny", "2")
    xml = build_tiny_ir(tmp_path / "ir-2-again", scale=5.0)
    control.store.add("tiny", ir_files(xml), "2")
    control.activate("tiny", "2")
    assert np.allclose(control.manager.infer("tiny", {"x": ONES}).outputs["y"], 6.0)  # not 101
