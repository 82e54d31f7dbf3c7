"""Signed releases: what the registry signs and every device checks the same way.

A release travels as an envelope `{"release", "key_id", "signature"}`. The Ed25519
signature covers the canonical JSON of `release` (sorted keys, no spaces, UTF-8), so
the device re-serialises what it received and verifies exactly that: any change to any
field breaks it. The private key stays on the registry; devices pin public keys.
See docs/updates.md for the contract.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from edged.config.mqtt import DEVICE_ID
from edged.errors import EdgedError, InvalidInput
from edged.fsio import atomic_write
from edged.models.manifest import FileName, Manifest, ModelName, Version, one_line

ENVELOPE_FIELDS = frozenset({"release", "key_id", "signature"})
# The largest envelope the registry signs and a device should accept (a manifest is at most
# 1 MiB too; the registry refuses to sign a release that would not fit).
MAX_ENVELOPE_BYTES = 1 << 20
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class SignatureError(EdgedError):
    """A release envelope that cannot be trusted; the message says why in one line."""


# --- canonical JSON and keys ---------------------------------------------------------------

def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, UTF-8, no NaN (docs/updates.md)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write the key as PEM PKCS8, mode 0600 from its first byte, atomically.

    Without `overwrite`, an existing file is never replaced (FileExistsError): losing a
    signing key means re-pinning a new one on every device.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write(path, data, replace=overwrite)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def _raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    return _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key: what a device pins in `updates.public_keys`."""
    return base64.b64encode(_raw(key)).decode("ascii")


def load_public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError):
        raise SignatureError("public key is not base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"public key is {len(raw)} bytes, an Ed25519 key has {PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def trusted_keys(texts: list[str]) -> dict[str, Ed25519PublicKey]:
    """Pinned public keys (base64 texts) by key id, as verify_envelope takes them."""
    keys = [load_public_key(text) for text in texts]
    return {key_id(key): key for key in keys}


# --- envelopes -----------------------------------------------------------------------------

def sign_release(release: dict, private_key: Ed25519PrivateKey) -> dict:
    """The envelope that carries `release`, signed over its canonical JSON."""
    signature = private_key.sign(canonical_json(release))
    return {"release": release, "key_id": key_id(private_key),
            "signature": base64.b64encode(signature).decode("ascii")}


def _strict_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify_envelope(data: bytes, trusted: dict[str, Ed25519PublicKey], max_bytes: int) -> dict:
    """The `release` of a signed envelope, or SignatureError saying in one line why not.

    Checks, in order: size, JSON, the envelope's fields, the key id against `trusted`,
    the signature. It does not check what the release says (see Release.parse).
    """
    if len(data) > max_bytes:
        raise SignatureError(f"release is {len(data)} bytes, over the {max_bytes} limit")
    try:
        envelope = json.loads(data, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SignatureError(f"release is not JSON: {reason}") from None
    if not isinstance(envelope, dict):
        raise SignatureError("release is not a JSON object")
    missing = sorted(ENVELOPE_FIELDS - envelope.keys())
    if missing:
        raise SignatureError(f"release envelope lacks {', '.join(missing)}")
    extra = sorted(envelope.keys() - ENVELOPE_FIELDS)
    if extra:
        raise SignatureError(f"release envelope has unexpected fields: {', '.join(extra)}")
    release, kid, signature = envelope["release"], envelope["key_id"], envelope["signature"]
    if not isinstance(release, dict) or not isinstance(kid, str) or not isinstance(signature, str):
        raise SignatureError("release envelope fields have the wrong types")
    public_key = trusted.get(kid)
    if public_key is None:
        raise SignatureError(f"unknown key id {kid[:32]!r}")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not base64") from None
    if len(raw_signature) != SIGNATURE_BYTES:
        raise SignatureError("bad signature")
    try:
        public_key.verify(raw_signature, canonical_json(release))
    except (InvalidSignature, ValueError):  # ValueError: a string that cannot be UTF-8 (lone surrogate)
        raise SignatureError("bad signature") from None
    return release


# --- what a release says ---------------------------------------------------------------------

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
DeviceId = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID.pattern}$")]
# Signed fields left out of the canonical JSON at their default, so a release that does not
# use them is byte for byte what devices that do not know them accept (extra="forbid").
OPTIONAL_FIELDS = {"device": None, "rollback": False, "rollback_from": None}


class SelfTest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: FileName = Field(description="A .npy file of the manifest: the model's first input.")
    expected: FileName = Field(description="A .npz file of the manifest: the outputs the registry computed.")
    atol: FiniteFloat = Field(ge=0, le=1e6, description="Absolute tolerance.")
    rtol: FiniteFloat = Field(ge=0, le=1e6, description="Relative tolerance, times |expected|.")


class Release(BaseModel):
    """The signed part of an envelope: the manifest, its audience and its validity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Manifest = Field(description="Exactly the store's manifest of the version.")
    group: ModelName | None = Field(description="The group it is for; None: every device (or one device).")
    device: DeviceId | None = Field(default=None, description="The one device it is for; None: a group "
                                                               "or every device.")
    rollback: bool = Field(default=False, strict=True,
                           description="Install even when older than the active version: an aborted "
                                       "rollout sends devices back.")
    rollback_from: Version | None = Field(
        default=None, description="With `rollback` only, and required by it: the version the "
                                  "rollback leaves (the aborted rollout's). A device installs the "
                                  "rollback only while that version is active, so a replayed "
                                  "rollback cannot undo a later rollout.")
    published_at: FiniteFloat = Field(ge=0, description="Seconds since the epoch when signed.")
    expires_at: FiniteFloat = Field(ge=0, description="Seconds since the epoch; refused afterwards.")
    selftest: SelfTest | None = Field(default=None, description="Input and expected outputs to check.")

    @model_validator(mode="after")
    def _consistent(self) -> Release:
        if self.expires_at <= self.published_at:
            raise ValueError("expires_at must be after published_at")
        if self.group is not None and self.device is not None:
            raise ValueError("a release is for a group or for a device, not both")
        if self.rollback and self.device is None:
            raise ValueError("a rollback release is for one device")
        if self.rollback != (self.rollback_from is not None):
            raise ValueError("rollback_from is required by rollback and only allowed with it")
        if self.selftest is not None:
            names = {f.name for f in self.manifest.files}
            for role, name, suffix in (("input", self.selftest.input, ".npy"),
                                       ("expected", self.selftest.expected, ".npz")):
                if name not in names:
                    raise ValueError(f"selftest {role} {name!r} is not a file of the manifest")
                if not name.endswith(suffix):
                    raise ValueError(f"selftest {role} {name!r} must be a {suffix} file")
        return self

    @classmethod
    def parse(cls, data: dict) -> Release:
        """A release from its (verified) dict, or InvalidInput in one line."""
        if not isinstance(data, dict):
            raise InvalidInput("invalid release: not a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput(f"invalid release: {one_line(exc)}") from None

    def to_dict(self) -> dict:
        """Plain JSON data, as it is signed: `device`, `rollback` and `rollback_from` only
        when set, so a release for every device or a group is what it was before they existed."""
        data = self.model_dump(mode="json")
        for key, default in OPTIONAL_FIELDS.items():
            if data[key] == default:
                del data[key]
        return data

    def expired(self, now: float) -> bool:
        """The one expiry rule, for the device and the registry alike: from `expires_at`
        itself on, the release is refused."""
        return now >= self.expires_at

    def due_for_resigning(self, now: float) -> bool:
        """Past two thirds of its validity: time to sign it again before devices refuse it."""
        return now >= self.published_at + (self.expires_at - self.published_at) * 2 / 3
