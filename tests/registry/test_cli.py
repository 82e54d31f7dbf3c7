"""`edged-registry` as a real subprocess: keygen, usage and configuration errors, exit codes."""

from __future__ import annotations

import base64
import json
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
    assert "with abort only" in registry.run("rollout", "pause", "tiny", "--force", expect=2).stderr

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
    for command in ("keygen", "publish", "list", "promote", "retire", "rollout", "fleet", "serve"):
        assert command in help_text.stdout


def test_rollout_commands_record_pause_resume_and_abort_a_rollout(registry, tiny_ir):
    """Without `serve` nothing is planned; the commands only change the rollout's file."""
    files = [tiny_ir, tiny_ir.with_suffix(".bin")]
    assert "announced nowhere" in registry.run("publish", "tiny", *files, "--version", "1", "--hold").stdout
    assert "stored, not retained" in registry.run("list").stdout
    assert registry.run("rollout", "status").stdout.strip() == "(no rollouts)"
    assert "must increase" in registry.run("rollout", "tiny", "1", "--waves", "50%,10%", expect=2).stderr
    assert "needs the model's name" in registry.run("rollout", "pause", expect=2).stderr
    missing = registry.run("rollout", "tiny", "7", expect=1)
    assert len(missing.stderr.strip().splitlines()) == 1

    recorded = registry.run("rollout", "tiny", "1", "--waves", "50%,100%", "--soak-s", "5",
                            "--max-failures", "1")
    assert "recorded rollout tiny 1 in waves 50%, 100%" in recorded.stdout
    assert "is running" in registry.run("rollout", "tiny", "1", expect=1).stderr
    (status,) = json.loads(registry.run("rollout", "status", "--json").stdout)
    assert (status["state"], status["soak_s"], status["max_failures"], status["planned_at"]) == (
        "running", 5.0, 1, None)
    assert [w["spec"] for w in status["waves"]] == ["50%", "100%"]
    assert "waiting for `edged-registry serve`" in registry.run("rollout", "status", "tiny").stdout
    assert "tiny 1 to all devices: paused" in registry.run("rollout", "pause", "tiny").stdout
    assert "is paused, not running" in registry.run("rollout", "pause", "tiny", expect=1).stderr
    assert "running" in registry.run("rollout", "resume", "tiny").stdout
    aborted = registry.run("rollout", "abort", "tiny").stdout
    assert "tiny 1 to all devices: aborted" in aborted  # none targeted: nothing to wait for
    assert "no rollout of face" in registry.run("rollout", "status", "face", expect=1).stderr
