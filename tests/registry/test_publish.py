"""publish, promote, retire, list: what ends up retained on the broker, signed and verifiable."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from edged.backends import LoadOptions, get_backend
from edged.models.manifest import Manifest, sha256_of
from tests.conftest import build_tiny_ir, ir_files
from tests.registry.conftest import retained_on

ALL = "edged/registry/models"
GROUPS = "edged/registry/groups"


def ir(tmp_path: Path, version: str, scale: float) -> list[Path]:
    return ir_files(build_tiny_ir(tmp_path / f"ir-{version}", scale=scale))


def test_publish_retains_a_release_that_verifies_with_the_public_key(
        registry, broker, mqtt_subscriber, tmp_path):
    files = ir(tmp_path, "1", 2.0)
    before = time.time()
    done = registry.run("publish", "tiny", *files, "--version", "1", "--description", "doubles")
    assert "published tiny 1 for all devices" in done.stdout

    message = retained_on(mqtt_subscriber, broker, f"{ALL}/tiny")
    assert message is not None and message.qos == 1
    envelope = json.loads(message.payload)
    assert envelope["key_id"] == next(iter(registry.trusted()))
    release = registry.verify(message.payload)
    assert release.group is None and release.selftest is None
    assert before - 1 <= release.published_at <= time.time() + 1
    assert abs(release.expires_at - release.published_at - 30 * 86400) < 1
    manifest = release.manifest
    assert (manifest.name, manifest.version, manifest.format, manifest.description) == \
        ("tiny", "1", "openvino", "doubles")
    assert {f.name: (f.sha256, f.size) for f in manifest.files} == \
        {p.name: (sha256_of(p), p.stat().st_size) for p in files}
    stored = registry.root / "models" / "tiny" / "1"
    assert manifest == Manifest.from_json((stored / "manifest.json").read_bytes())  # the store's manifest
    assert all((stored / p.name).read_bytes() == p.read_bytes() for p in files)
    assert json.loads((stored / "release.json").read_bytes()) == envelope

    assert registry.run("publish", "tiny", *files, "--version", "1", expect=1).stderr.count("already exists")
    listing = json.loads(registry.run("list", "--json").stdout)
    assert listing == {"tiny": {"1": {"retired": False, "all_devices": True, "groups": []}}}


def test_publish_a_tflite_with_labels_preprocessing_and_decoder(
        registry, broker, mqtt_subscriber, sample_models, tmp_path):
    pin = json.loads(Path("models/samples.json").read_text())["models"]["face"]
    (tmp_path / "pre.json").write_text(json.dumps(pin["preprocessing"]))
    (tmp_path / "dec.json").write_text(json.dumps(pin["decoder"]))
    (tmp_path / "labels.txt").write_text("face\n")
    registry.run("publish", "face", sample_models["face"], "--version", "1",
                 "--preprocess", tmp_path / "pre.json", "--decoder", tmp_path / "dec.json",
                 "--labels", tmp_path / "labels.txt")
    release = registry.verify(retained_on(mqtt_subscriber, broker, f"{ALL}/face").payload)
    manifest = release.manifest
    assert manifest.format == "tflite" and manifest.entry == "face_detection_short_range.tflite"
    assert manifest.files[0].sha256 == pin["sha256"] and manifest.files[0].size == pin["size"]
    assert manifest.preprocessing == pin["preprocessing"] and manifest.decoder == {"type": "blazeface"}
    assert manifest.labels == ["face"]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def test_selftest_outputs_are_what_the_model_computes(
        registry, broker, mqtt_subscriber, sample_models, tmp_path):
    # The IR computes relu(2x + 1): the expected outputs can be checked by hand.
    x = np.array([[1.0, -2.0, 0.25, -0.5]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    registry.run("publish", "tiny", *ir(tmp_path, "1", 2.0), "--version", "1",
                 "--selftest", tmp_path / "x.npy", "--atol", "0.0001", "--rtol", "0.001")
    release = registry.verify(retained_on(mqtt_subscriber, broker, f"{ALL}/tiny").payload)
    assert release.selftest.model_dump() == {
        "input": "selftest-input.npy", "expected": "selftest-expected.npz", "atol": 0.0001, "rtol": 0.001}
    stored = registry.root / "models" / "tiny" / "1"
    files = {f.name: f for f in release.manifest.files}
    for name in ("selftest-input.npy", "selftest-expected.npz"):
        assert files[name].sha256 == sha256_of(stored / name)
    np.testing.assert_array_equal(np.load(stored / "selftest-input.npy"), x)
    expected = read_npz(stored / "selftest-expected.npz")
    assert list(expected) == ["y"]
    np.testing.assert_allclose(expected["y"], np.maximum(x * 2 + 1, 0), rtol=1e-6)
    assert zipfile.is_zipfile(stored / "selftest-expected.npz")

    # A real TFLite model: the outputs must match what edged's own backend computes for the input.
    face_input = np.random.default_rng(7).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    np.save(tmp_path / "face.npy", face_input)
    registry.run("publish", "face", sample_models["face"], "--version", "1",
                 "--selftest", tmp_path / "face.npy")
    expected = read_npz(registry.root / "models" / "face" / "1" / "selftest-expected.npz")
    model = get_backend("openvino").load(sample_models["face"], "tflite",
                                         LoadOptions(precision="f32", workers=1))
    try:
        computed = model.infer({model.inputs[0].name: face_input})
    finally:
        model.close()
    assert sorted(expected) == sorted(computed)
    for name, values in computed.items():
        np.testing.assert_allclose(expected[name], values, atol=1e-3, rtol=1e-2)

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 5), dtype=np.float32))
    done = registry.run("publish", "tiny", *ir(tmp_path, "2", 3.0), "--version", "2", "--selftest", wrong,
                        expect=1)
    assert "must have shape [1, 4]" in done.stderr
    assert not (registry.root / "models" / "tiny" / "2").exists()
    assert list((registry.root / "tmp").iterdir()) == []


def test_group_publish_goes_only_to_the_group_and_promote_moves_it_on(
        registry, broker, mqtt_subscriber, tmp_path):
    files = ir(tmp_path, "1", 2.0)
    done = registry.run("publish", "tiny", *files, "--version", "1", "--group", "canary")
    assert "for group canary" in done.stdout
    canary = retained_on(mqtt_subscriber, broker, f"{GROUPS}/canary/models/tiny")
    assert registry.verify(canary.payload).group == "canary"
    assert retained_on(mqtt_subscriber, broker, f"{ALL}/tiny") is None

    registry.run("promote", "tiny", "1", "--group", "beta")
    registry.run("promote", "tiny", "1")
    for topic, group in ((f"{GROUPS}/beta/models/tiny", "beta"), (f"{ALL}/tiny", None)):
        release = registry.verify(retained_on(mqtt_subscriber, broker, topic).payload)
        assert release.group == group and release.manifest.version == "1"
    # Each topic holds its own signature: the group is signed, so a release cannot change audience.
    assert registry.verify(retained_on(mqtt_subscriber, broker, f"{GROUPS}/canary/models/tiny").payload) \
        .group == "canary"
    listing = json.loads(registry.run("list", "--json").stdout)
    assert listing["tiny"]["1"] == {"retired": False, "all_devices": True, "groups": ["beta", "canary"]}

    registry.run("publish", "tiny", *ir(tmp_path, "2", 3.0), "--version", "2")
    note = registry.run("promote", "tiny", "1").stdout
    assert "replacing 2" in note and "unless told to roll back" in note
    assert registry.run("promote", "tiny", "9", expect=1).stderr.count("not found")


def test_retire_withdraws_the_release_everywhere(registry, broker, mqtt_subscriber, tmp_path):
    files = ir(tmp_path, "1", 2.0)
    registry.run("publish", "tiny", *files, "--version", "1")
    registry.run("promote", "tiny", "1", "--group", "canary")
    watcher = mqtt_subscriber(broker, "edged/registry/#")
    watcher.wait_count(2, topic="edged/registry/+/#")

    done = registry.run("retire", "tiny", "1")
    assert "withdrawn from all devices, group canary" in done.stdout
    # Subscribers see the empty message; newcomers find nothing retained.
    for topic in (f"{ALL}/tiny", f"{GROUPS}/canary/models/tiny"):
        watcher.wait_for(lambda m: m.payload == b"", topic=topic)
        assert retained_on(mqtt_subscriber, broker, topic) is None
    assert (registry.root / "models" / "tiny" / "1" / ".retired").exists()
    assert json.loads(registry.run("list", "--json").stdout)["tiny"]["1"]["retired"] is True
    assert "retired" in registry.run("list").stdout
    assert "is retired" in registry.run("promote", "tiny", "1", expect=1).stderr


def test_publish_while_the_broker_is_away_is_stored_and_serve_announces_it(
        make_registry, start_broker, mqtt_subscriber, tmp_path):
    broker = start_broker()
    registry = make_registry(broker)
    broker.stop()
    done = registry.run("publish", "tiny", *ir(tmp_path, "1", 2.0), "--version", "1", expect=1)
    assert "stored" in done.stderr and "not announced" in done.stderr and "serve" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "retained for all devices" in registry.run("list").stdout

    broker.start()
    status = mqtt_subscriber(broker, "edged/registry/status")
    registry.serve(status)
    release = registry.verify(retained_on(mqtt_subscriber, broker, f"{ALL}/tiny").payload)
    assert release.manifest.version == "1"


def test_serve_signs_again_a_release_past_two_thirds_of_its_validity(
        make_registry, broker, mqtt_subscriber, tmp_path):
    validity_days = 1.5 / 86400  # a second and a half
    registry = make_registry(broker, {"release_days": validity_days})
    registry.run("publish", "tiny", *ir(tmp_path, "1", 2.0), "--version", "1")
    first = registry.verify(retained_on(mqtt_subscriber, broker, f"{ALL}/tiny").payload)
    due = first.published_at + (first.expires_at - first.published_at) * 2 / 3
    while time.time() < due:  # waiting for the clock, not for the program
        time.sleep(0.05)

    status = mqtt_subscriber(broker, "edged/registry/status")
    releases = mqtt_subscriber(broker, f"{ALL}/tiny")
    registry.serve(status)
    renewed_message = releases.wait_for(
        lambda m: registry.verify(m.payload).published_at > first.published_at)
    renewed = registry.verify(renewed_message.payload)
    assert renewed.manifest == first.manifest and renewed.group is None
    assert renewed.expires_at > first.expires_at
    stored = (registry.root / "retained" / "models" / "tiny.json").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(renewed_message.payload).digest()
