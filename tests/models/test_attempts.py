"""Attempt records on a real store, with real crashes: a process that dies while a backend
loads a model leaves a record; the next load of that combination skips the backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edged.backends.base import LoadOptions
from edged.backends.selection import TEST_CRASH_VARIABLE, BackendSkipped, runtime_version
from edged.config import ModelSettings, load_settings
from edged.models.attempts import DIRECTORY, Attempts
from edged.models.lifecycle import ModelEvents
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from tests.conftest import ROOT, _load_fetch_tool, build_tiny_ir, ir_files

OPTIONS = {"openvino": LoadOptions(), "litert": LoadOptions()}

# A process that records an attempt of tiny 1 on openvino (on the CPU, or argv[3]) and aborts inside it.
ABORT_IN_ATTEMPT = """
import os, sys
from edged.backends.base import LoadOptions
from edged.config import ModelSettings
from edged.models.attempts import Attempts
from edged.models.store import ModelStore
guard = Attempts(ModelStore(sys.argv[1]), print).guard(
    "tiny", sys.argv[2], ModelSettings(), {"openvino": LoadOptions(), "litert": LoadOptions()})
with guard("openvino", sys.argv[3] if len(sys.argv) > 3 else "CPU"):
    os.abort()
"""

# A process that loads every active model, as the daemon does at start.
LOAD_ALL = """
import sys
from edged.config import load_settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
store = ModelStore(sys.argv[1])
settings = load_settings(None, store={"path": sys.argv[1]},
                         backends={"openvino_cache_dir": sys.argv[2], "probe_runs": 3})
ModelManager(store, settings).load_all()
"""


def run_python(code: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def records(store: ModelStore) -> list[Path]:
    return sorted((store.root / DIRECTORY).glob("*.json"))


def crash_in_attempt(store: ModelStore, version: str = "1", device: str = "CPU") -> None:
    result = run_python(ABORT_IN_ATTEMPT, store.root, version, device)
    assert result.returncode == -signal.SIGABRT, result.stderr


def test_a_load_that_returns_or_raises_leaves_no_record(tiny_store):
    guard = Attempts(tiny_store, print).guard("tiny", "1", ModelSettings(), OPTIONS)
    with guard("openvino", "CPU"):
        assert len(records(tiny_store)) == 1
    with pytest.raises(ValueError), guard("openvino", "CPU"):
        raise ValueError("a load that raises")
    assert records(tiny_store) == []
    with guard("openvino", "CPU"):  # nothing remembered: tried again
        pass


def test_a_load_in_progress_is_not_taken_for_a_crash(tiny_store):
    attempts = Attempts(tiny_store, print)
    with attempts.guard("tiny", "1", ModelSettings(), OPTIONS)("openvino", "CPU"):
        assert attempts.crashed() == {}
        # Another process (an `edged run --check` beside the daemon) sees the lock too.
        seen = run_python("import sys; from edged.models.attempts import Attempts; "
                          "from edged.models.store import ModelStore; "
                          "print(len(Attempts(ModelStore(sys.argv[1]), print).crashed()))", tiny_store.root)
        assert seen.stdout.strip() == "0", seen.stderr
        assert len(records(tiny_store)) == 1  # and it did not prune it


def test_a_process_that_died_in_a_load_makes_that_backend_skipped(tiny_store):
    crash_in_attempt(tiny_store)
    [path] = records(tiny_store)
    record = json.loads(path.read_text())
    assert record["model"] == "tiny" and record["backend"] == "openvino"
    assert record["runtime"] == runtime_version("openvino")
    skips: list[dict] = []
    attempts = Attempts(tiny_store, skips.append)
    guard = attempts.guard("tiny", "1", ModelSettings(), OPTIONS)
    for _ in range(2):
        with pytest.raises(BackendSkipped) as info, guard("openvino", "CPU"):
            pytest.fail("a skipped backend must not be entered")
    expected = (f"openvino on CPU crashed the daemon while loading tiny 1 "
                f"(runtime {runtime_version('openvino')}); not tried again until the model version, "
                "the runtime version or the config changes")
    assert str(info.value) == expected
    assert [s["backend"] for s in skips] == ["openvino"], "reported once per process"
    assert skips[0]["reason"] == expected and skips[0]["version"] == "1"
    assert attempts.skipped() == {"tiny": expected}
    with guard("litert", "CPU"):  # the other backend is tried as usual
        pass
    assert records(tiny_store) == [path], "the crash record stays"


# A process that records an attempt of tiny 1 on openvino, says it is exiting on purpose
# (release_own, as the daemon does before it exits with a load still running), starts
# another load (not recorded any more) and dies inside both.
RELEASE_THEN_DIE = """
import os, sys
from edged.backends.base import LoadOptions
from edged.config import ModelSettings
from edged.models.attempts import Attempts
from edged.models.store import ModelStore
attempts = Attempts(ModelStore(sys.argv[1]), print)
guard = attempts.guard("tiny", "1", ModelSettings(), {"openvino": LoadOptions(), "litert": LoadOptions()})
with guard("openvino", "CPU"):
    print(attempts.release_own(), flush=True)
    with guard("litert", "CPU"):
        os.abort()
"""


def test_a_process_that_exits_on_purpose_in_a_load_leaves_no_record(tiny_store):
    result = run_python(RELEASE_THEN_DIE, tiny_store.root)
    assert result.returncode == -signal.SIGABRT, result.stderr
    assert result.stdout.split() == ["1"]  # its one record of a load in progress
    assert records(tiny_store) == []
    attempts = Attempts(tiny_store, print)
    assert attempts.crashed() == {}
    with attempts.guard("tiny", "1", ModelSettings(), OPTIONS)("openvino", "CPU"):  # tried again
        pass
    assert attempts.skipped() == {}


def test_forget_clears_the_records_of_one_model(tiny_store):
    crash_in_attempt(tiny_store)
    attempts = Attempts(tiny_store, print)
    assert attempts.forget("face") == 0
    assert attempts.forget("tiny") == 1
    assert records(tiny_store) == []
    with attempts.guard("tiny", "1", ModelSettings(), OPTIONS)("openvino", "CPU"):
        pass


@pytest.mark.parametrize("change", ["version", "model settings", "load options"])
def test_a_new_version_or_config_is_tried_again(tiny_store, change):
    crash_in_attempt(tiny_store)
    version, settings, options = "1", ModelSettings(), dict(OPTIONS)
    if change == "version":
        version = "2"
    elif change == "model settings":
        settings = ModelSettings(reject_non_finite=False)
    else:
        options["openvino"] = LoadOptions(workers=1)
    attempts = Attempts(tiny_store, print)
    with attempts.guard("tiny", version, settings, options)("openvino", "CPU"):
        pass
    assert attempts.skipped() == {}


def test_a_crash_on_one_device_spares_the_others(tiny_store):
    """A GPU driver that crashed the daemon says nothing about the CPU plugin: the record
    holds the device, and only that (backend, device) pair is skipped."""
    crash_in_attempt(tiny_store, device="GPU")
    [record] = [json.loads(path.read_text()) for path in records(tiny_store)]
    assert (record["backend"], record["device"]) == ("openvino", "GPU")
    skips: list[dict] = []
    guard = Attempts(tiny_store, skips.append).guard("tiny", "1", ModelSettings(), OPTIONS)
    with guard("openvino", "CPU"):
        pass
    with pytest.raises(BackendSkipped, match=r"^openvino on GPU crashed the daemon while loading tiny 1 "), \
            guard("openvino", "GPU"):
        pytest.fail("a skipped candidate must not be entered")
    assert [(s["backend"], s["device"]) for s in skips] == [("openvino", "GPU")]


def test_a_record_from_before_devices_is_forgotten(tiny_store):
    crash_in_attempt(tiny_store)
    [path] = records(tiny_store)
    record = json.loads(path.read_text())
    del record["device"]
    path.write_text(json.dumps(record))
    Attempts(tiny_store, print)
    assert records(tiny_store) == []


def test_records_that_cannot_match_again_are_forgotten(tiny_store, tmp_path):
    ir = build_tiny_ir(tmp_path / "ir2", scale=3.0)
    tiny_store.add("tiny", ir_files(ir), "2")
    crash_in_attempt(tiny_store, "1")
    crash_in_attempt(tiny_store, "2")
    assert len(records(tiny_store)) == 2
    tiny_store.remove("tiny", "2")
    [kept] = [p for p in records(tiny_store) if json.loads(p.read_text())["version"] == "1"]
    Attempts(tiny_store, print)
    assert records(tiny_store) == [kept], "version 2 left the store: its record is dropped"
    record = json.loads(kept.read_text())
    kept.write_text(json.dumps({**record, "runtime": "openvino 2020.1.0"}))
    Attempts(tiny_store, print)
    assert records(tiny_store) == [], "a record of a runtime no longer installed is dropped"


def test_the_manager_serves_face_on_litert_after_openvino_crashed_it(sample_models, tmp_path):
    store = ModelStore(tmp_path / "store")
    _load_fetch_tool().add_sample(store, "face", sample_models["face"])
    store.activate("face", "1")
    cache = tmp_path / "cache"
    crashed = run_python(LOAD_ALL, store.root, cache, env={TEST_CRASH_VARIABLE: "openvino"})
    assert crashed.returncode == -signal.SIGABRT, crashed.stderr
    settings = load_settings(None, store={"path": str(store.root)},
                             backends={"openvino_cache_dir": str(cache), "probe_runs": 3})
    events: list[tuple[str, dict]] = []
    manager = ModelManager(store, settings, ModelEvents.each(lambda e: events.append((e.kind, e.as_dict()))))
    try:
        manager.load_all()
        face = manager.status()["face"]
        assert face["state"] == "ready" and face["backend"] == "litert"
        assert face["skipped"].startswith("openvino on CPU crashed the daemon while loading face 1 (runtime ")
        assert face["probes"]["openvino/CPU"]["skipped"] is True
        assert "openvino/CPU skipped: openvino on CPU crashed the daemon" in face["reason"]
        assert [kind for kind, _ in events] == ["model_skipped", "model_loaded"]
        assert events[0][1]["backend"] == "openvino" and events[0][1]["model"] == "face"
    finally:
        manager.close()
