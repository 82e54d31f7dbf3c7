"""Signed releases: the envelope both the registry and the devices check (edged/signing.py)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import stat
from pathlib import Path

import pytest

from edged.errors import EdgedError, InvalidInput
from edged.signing import (
    Release,
    SignatureError,
    canonical_json,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_text,
    save_private_key,
    sign_release,
    trusted_keys,
    verify_envelope,
)

SHA = "ab" * 32
MAX = 64 * 1024


def release_dict(**changes: object) -> dict:
    release = {
        "manifest": {"name": "face", "version": "3", "format": "tflite",
                     "files": [{"name": "face.tflite", "sha256": SHA, "size": 229032},
                               {"name": "selftest-input.npy", "sha256": "cd" * 32, "size": 196736},
                               {"name": "selftest-expected.npz", "sha256": "ef" * 32, "size": 3830}],
                     "labels": None, "preprocessing": {"resize": "letterbox"},
                     "decoder": {"type": "blazeface"}, "description": "visages é"},
        "group": None,
        "published_at": 1795776000.0,
        "expires_at": 1798368000.0,
        "selftest": {"input": "selftest-input.npy", "expected": "selftest-expected.npz",
                     "atol": 0.001, "rtol": 0.01},
    }
    release.update(changes)
    return release


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def trusted(key):
    return {key_id(key): key.public_key()}


def envelope_bytes(envelope: dict) -> bytes:
    return json.dumps(envelope).encode()


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1.5, "é"], "c": None}) == '{"a":[1.5,"é"],"b":1,"c":null}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_a_signed_release_verifies_and_parses(key, trusted):
    envelope = sign_release(release_dict(), key)
    assert set(envelope) == {"release", "key_id", "signature"}
    assert envelope["key_id"] == key_id(key) and len(envelope["key_id"]) == 16
    # Any JSON layout of the same data verifies: the signature covers the canonical form.
    pretty = json.dumps(envelope, indent=4, sort_keys=False).encode()
    release = verify_envelope(pretty, trusted, MAX)
    assert release == release_dict()
    parsed = Release.parse(release)
    assert parsed.manifest.entry == "face.tflite" and parsed.selftest.atol == 0.001
    assert parsed.to_dict()["manifest"]["files"][0]["sha256"] == SHA


TAMPERINGS = {
    "file sha256": lambda r: r["manifest"]["files"][0].update(sha256="00" * 32),
    "file size": lambda r: r["manifest"]["files"][0].update(size=229033),
    "file name": lambda r: r["manifest"]["files"][0].update(name="face2.tflite"),
    "version": lambda r: r["manifest"].update(version="4"),
    "name": lambda r: r["manifest"].update(name="other"),
    "preprocessing": lambda r: r["manifest"]["preprocessing"].update(resize="stretch"),
    "decoder": lambda r: r["manifest"].update(decoder=None),
    "labels": lambda r: r["manifest"].update(labels=["x"]),
    "group": lambda r: r.update(group="canary"),
    "published_at": lambda r: r.update(published_at=1795776001.0),
    "expires_at": lambda r: r.update(expires_at=1898368000.0),
    "selftest tolerance": lambda r: r["selftest"].update(atol=1.0),
    "selftest dropped": lambda r: r.update(selftest=None),
    "extra field": lambda r: r.update(extra=1),
}


@pytest.mark.parametrize("change", TAMPERINGS)
def test_any_change_to_the_release_breaks_the_signature(key, trusted, change):
    envelope = sign_release(release_dict(), key)
    tampered = copy.deepcopy(envelope)
    TAMPERINGS[change](tampered["release"])
    assert tampered["release"] != envelope["release"]
    with pytest.raises(SignatureError, match=r"^bad signature$"):
        verify_envelope(envelope_bytes(tampered), trusted, MAX)


def test_a_changed_signature_fails(key, trusted):
    envelope = sign_release(release_dict(), key)
    raw = bytearray(base64.b64decode(envelope["signature"]))
    raw[0] ^= 1
    envelope["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(envelope_bytes(envelope), trusted, MAX)
    envelope["signature"] = "not base64!"
    with pytest.raises(SignatureError, match="not base64"):
        verify_envelope(envelope_bytes(envelope), trusted, MAX)


def test_a_release_signed_by_another_key_is_refused(key, trusted):
    other = generate_key()
    envelope = sign_release(release_dict(), other)
    with pytest.raises(SignatureError, match=f"unknown key id '{key_id(other)}'"):
        verify_envelope(envelope_bytes(envelope), trusted, MAX)
    envelope["key_id"] = key_id(key)  # claiming the trusted key does not help
    with pytest.raises(SignatureError, match="bad signature"):
        verify_envelope(envelope_bytes(envelope), trusted, MAX)
    assert verify_envelope(envelope_bytes(sign_release(release_dict(), other)),
                           {**trusted, key_id(other): other.public_key()}, MAX)["group"] is None


@pytest.mark.parametrize(("data", "reason"), [
    (b"x" * (MAX + 1), f"over the {MAX} limit"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"release": {}, "key_id": "k"}', "lacks signature"),
    (b'{"release": {}, "key_id": "k", "signature": "s", "more": 1}', "unexpected fields: more"),
    (b'{"release": [], "key_id": "k", "signature": "s"}', "wrong types"),
    (b'{"release": {"x": NaN}, "key_id": "k", "signature": "s"}', "not JSON"),
    (b'{"release": {}, "release": {}, "key_id": "k", "signature": "s"}', "duplicate key"),
    (b"[" * 100_000, "not JSON"),
])
def test_malformed_envelopes_are_refused_in_one_line(trusted, data, reason):
    with pytest.raises(SignatureError, match=reason) as caught:
        verify_envelope(data, trusted, 2 * MAX if data.startswith(b"[[") else MAX)
    assert "\n" not in str(caught.value) and isinstance(caught.value, EdgedError)


def test_private_key_file_is_0600_atomic_and_never_replaced(tmp_path: Path, key):
    path = tmp_path / "keys" / "registry.key"
    save_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_id(load_private_key(path)) == key_id(key)
    with pytest.raises(FileExistsError):
        save_private_key(path, generate_key())
    assert key_id(load_private_key(path)) == key_id(key)
    assert sorted(p.name for p in path.parent.iterdir()) == ["registry.key"]  # no temp file left
    other = generate_key()
    save_private_key(path, other, overwrite=True)
    assert key_id(load_private_key(path)) == key_id(other)
    path.write_text("garbage")
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_private_key(path)
    with pytest.raises(SignatureError, match="cannot read the signing key"):
        load_private_key(tmp_path / "missing.key")


def test_public_key_text_round_trip_and_key_id(key):
    text = public_key_text(key)
    raw = base64.b64decode(text)
    assert len(raw) == 32 and public_key_text(key.public_key()) == text
    assert key_id(load_public_key(text)) == hashlib.sha256(raw).hexdigest()[:16] == key_id(key)
    assert list(trusted_keys([text, f"  {text}\n"])) == [key_id(key)]
    with pytest.raises(SignatureError, match="not base64"):
        load_public_key("%%%")
    with pytest.raises(SignatureError, match="is 16 bytes"):
        load_public_key(base64.b64encode(b"x" * 16).decode())


@pytest.mark.parametrize(("changes", "reason"), [
    ({"selftest": {"input": "missing.npy", "expected": "selftest-expected.npz", "atol": 0, "rtol": 0}},
     "not a file of the manifest"),
    ({"selftest": {"input": "selftest-expected.npz", "expected": "selftest-expected.npz", "atol": 0,
                   "rtol": 0}}, "must be a .npy file"),
    ({"expires_at": 1795776000.0}, "expires_at must be after published_at"),
    ({"published_at": "1795776000"}, "published_at"),
    ({"group": "../x"}, "group"),
    ({"more": 1}, "more"),
    ({"manifest": {"name": "face"}}, "manifest"),
])
def test_release_parse_refuses_what_the_contract_forbids(changes, reason):
    with pytest.raises(InvalidInput, match=reason) as caught:
        Release.parse(release_dict(**changes))
    assert "\n" not in str(caught.value)


def test_release_knows_when_to_be_signed_again():
    release = Release.parse(release_dict(published_at=0.0, expires_at=30.0))
    assert not release.due_for_resigning(19.9) and release.due_for_resigning(20.0)
    assert not release.expired(29.9) and release.expired(30.0)


def test_a_release_is_expired_from_its_expiry_itself_not_one_tick_later():
    """The boundary the update agent and the registry share (`Release.expired`)."""
    release = Release.parse(release_dict(published_at=0.0, expires_at=30.0))
    assert not release.expired(math.nextafter(30.0, 0.0))
    assert release.expired(30.0)


# --- a release for one device (issue 13) ------------------------------------------------------

# Signed by the code before `device` and `rollback` existed, with the key of seed 0..31:
# a release for every device, and one for a group without a self-test.
SIGNED_BEFORE = {
    "every device": ({},
                     "YVJ/tljRj8RCQHOk60er3GollsRKMGmzcTQ6OsCDAlpkh9cRN+rg8efF7BBonHYbmcfnuuTveSfP1L/NmpFPDQ=="),
    "a group": ({"group": "canary", "selftest": None},
                "qYdF8t4el0jdF+dXP7W7eYRfHLl6WCeSURYkRlsfCFkCmbgI+yg6BTaUzCm9DLxC7h4t0Ummdz4Zocxgbnh5CQ=="),
}


@pytest.mark.parametrize("audience", SIGNED_BEFORE)
def test_a_release_without_device_or_rollback_is_signed_as_before(audience):
    """Devices on older code parse releases with extra="forbid": a release for every device
    or a group must not gain `device: null` or `rollback: false`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    changes, signature = SIGNED_BEFORE[audience]
    data = Release.parse(release_dict(**changes)).to_dict()
    assert set(data) == {"manifest", "group", "published_at", "expires_at", "selftest"}
    assert data == release_dict(**changes)
    fixed_key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert sign_release(data, fixed_key)["signature"] == signature


def test_a_device_release_carries_its_device_and_rollback_and_both_are_signed(key, trusted):
    release = Release.parse(release_dict(device="cam-1", rollback=True, rollback_from="4"))
    assert (release.device, release.rollback, release.group) == ("cam-1", True, None)
    assert release.rollback_from == "4"
    data = release.to_dict()
    assert data["device"] == "cam-1" and data["rollback"] is True and data["rollback_from"] == "4"
    assert Release.parse(release_dict(device="cam-1")).to_dict().keys() == {*release_dict(), "device"}
    envelope = sign_release(data, key)
    for field, value in (("device", "cam-2"), ("rollback", False), ("rollback_from", "5")):
        tampered = copy.deepcopy(envelope)
        tampered["release"][field] = value
        with pytest.raises(SignatureError, match=r"^bad signature$"):
            verify_envelope(envelope_bytes(tampered), trusted, MAX)
    dropped = copy.deepcopy(envelope)
    del dropped["release"]["device"]
    with pytest.raises(SignatureError, match=r"^bad signature$"):
        verify_envelope(envelope_bytes(dropped), trusted, MAX)
    assert Release.parse(verify_envelope(envelope_bytes(envelope), trusted, MAX)) == release


@pytest.mark.parametrize(("changes", "reason"), [
    ({"rollback": True, "rollback_from": "4"}, "a rollback release is for one device"),
    ({"device": "cam-1", "rollback": True}, "rollback_from is required by rollback"),
    ({"device": "cam-1", "rollback_from": "4"}, "only allowed with it"),
    ({"device": "cam-1", "rollback": True, "rollback_from": "../4"}, "rollback_from"),
    ({"group": "canary", "device": "cam-1"}, "for a group or for a device, not both"),
    ({"device": "../cam"}, "device"),
    ({"device": ""}, "device"),
    ({"device": "cam-1", "rollback": 1, "rollback_from": "4"}, "rollback"),
])
def test_device_and_rollback_are_checked(changes, reason):
    with pytest.raises(InvalidInput, match=reason) as caught:
        Release.parse(release_dict(**changes))
    assert "\n" not in str(caught.value)


def test_release_topics_for_every_device_a_group_and_one_device():
    from edged.topics import Topics, release_suffix

    device, registry = Topics("edged", "cam-1"), Topics("edged")
    assert device.release("face") == "edged/registry/models/face"
    assert device.release("face", "pilot") == "edged/registry/groups/pilot/models/face"
    assert device.release("face", device="cam-2") == "edged/registry/devices/cam-2/models/face"
    assert release_suffix("face", None, "cam-2") == "devices/cam-2/models/face"
    with pytest.raises(ValueError, match="not both"):
        device.release("face", "pilot", "cam-2")
    assert device.releases("pilot") == ["edged/registry/models/+", "edged/registry/groups/pilot/models/+",
                                        "edged/registry/devices/cam-1/models/+"]
    assert device.releases() == ["edged/registry/models/+", "edged/registry/devices/cam-1/models/+"]
    assert registry.releases("pilot") == ["edged/registry/models/+", "edged/registry/groups/pilot/models/+"]
    assert Topics.release_parts("edged/registry/models/face") == ("face", None, None)
    assert Topics.release_parts("edged/registry/groups/pilot/models/face") == ("face", "pilot", None)
    assert Topics.release_parts("edged/registry/devices/cam-1/models/face") == ("face", None, "cam-1")
    assert Topics.release_parts("site/a/registry/devices/groups/models/face") == ("face", None, "groups")
