"""The sample-model tool: pinned files, and a store kept on the current pin."""

from __future__ import annotations

import hashlib
import json

from edged.models.store import ModelStore
from tests.conftest import ROOT, _load_fetch_tool


def test_samples_match_their_pins(sample_models):
    pins = json.loads((ROOT / "models" / "samples.json").read_text())["models"]
    for name, path in sample_models.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pins[name]["sha256"]
        assert path.stat().st_size == pins[name]["size"]


def test_add_to_store_moves_an_old_store_to_the_current_pin(sample_models, tmp_path, capsys):
    tool = _load_fetch_tool()
    store = ModelStore(tmp_path / "store")
    store.add("face", [sample_models["face"]], "1")  # as an older pin left it: no decoder
    store.activate("face", "1")
    tool.add_to_store(sample_models, str(store.root))
    assert store.active("face") == "2"
    assert store.manifest("face", "2").decoder == {"type": "blazeface"}
    assert store.active("selfie") == "1"
    tool.add_to_store(sample_models, str(store.root))  # nothing new the second time
    assert store.versions("face") == ["1", "2"] and store.active("face") == "2"
    assert "face: version 2 active" in capsys.readouterr().out
