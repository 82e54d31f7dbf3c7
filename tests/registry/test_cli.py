"""`edged-registry` as a real subprocess: keygen, usage and configuration errors, exit codes."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys

from edged.signing import key_id, load_private_key, load_public_key


def test_keygen_writes_a_0600_key_once_and_prints_what_to_pin(make_registry, broker):
    registry = make_registry(broker, keygen=False)
    done = registry.run("keygen")
    key_file = registry.root / "keys" / "registry.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = load_private_key(key_file)
    public = registry.public_key_text
    assert len(base64.b64decode(public)) == 32 and key_id(load_public_key(public)) == key_id(key)
    assert public in done.stdout and key_id(key) in done.stdout

    again = registry.run("keygen", expect=1)
    assert "refusing to replace the signing key" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert key_id(load_private_key(key_file)) == key_id(key)


def test_usage_and_configuration_errors_exit_2(make_registry, broker):
    registry = make_registry(broker, keygen=False)
    assert registry.run(expect=2).stderr  # no command
    assert "--version" in registry.run("publish", "tiny", "x.tflite", expect=2).stderr
    assert "--wait" in registry.run("fleet", "--wait", "-1", expect=2).stderr

    registry.config.write_text("max_chunk_bytes = 5\n")  # tests/registry/test_config.py has the rest
    done = registry.run("list", expect=2)
    assert "max_chunk_bytes" in done.stderr and "EDGED_REGISTRY_MAX_CHUNK_BYTES" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_publish_without_a_signing_key_says_to_run_keygen(make_registry, broker, tiny_ir):
    registry = make_registry(broker, keygen=False)
    done = registry.run("publish", "tiny", tiny_ir, tiny_ir.with_suffix(".bin"), "--version", "1", expect=1)
    assert "edged-registry keygen" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (registry.root / "models" / "tiny").exists()


def test_the_console_script_and_the_module_are_the_same_program():
    program = [sys.executable, "-m", "edged.registry"]
    script = subprocess.run([*program, "--version"], capture_output=True, text=True)
    assert script.returncode == 0 and script.stdout.startswith("edged-registry ")
    help_text = subprocess.run([*program, "--help"], capture_output=True, text=True)
    for command in ("keygen", "publish", "list", "promote", "retire", "fleet", "serve"):
        assert command in help_text.stdout
