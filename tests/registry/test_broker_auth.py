"""The registry's broker connection uses the daemon's [mqtt] settings: password_file, TLS, and
says plainly when the broker refuses it."""

from __future__ import annotations

from tests.conftest import build_tiny_ir, ir_files
from tests.registry.conftest import retained_on


def test_password_file_and_an_acl_that_refuses(make_registry, start_broker, mqtt_subscriber, tmp_path):
    broker = start_broker("password", users={"registry": "s3cret", "viewer": "look"},
                          acl={"registry": ["readwrite edged/#"], "viewer": ["read edged/#"]})
    (tmp_path / "password").write_text("s3cret\n")
    registry = make_registry(broker, {"mqtt": {"username": "registry",
                                               "password_file": str(tmp_path / "password")}})
    files = ir_files(build_tiny_ir(tmp_path / "ir"))
    registry.run("publish", "tiny", *files, "--version", "1")
    assert registry.verify(retained_on(mqtt_subscriber, broker, "edged/registry/models/tiny").payload)

    (tmp_path / "password").write_text("wrong\n")
    done = registry.run("promote", "tiny", "1", "--group", "g1", expect=1)
    assert "refused the connection" in done.stderr and "not announced" in done.stderr

    viewer = make_registry(broker, {"mqtt": {"username": "viewer", "password": "look"}})
    done = viewer.run("publish", "tiny", *files, "--version", "1", expect=1)
    assert "refused the message" in done.stderr and "Not authorized" in done.stderr
    assert "retained for all devices" in viewer.run("list").stdout  # stored all the same


def test_tls(make_registry, start_broker, mqtt_subscriber, tmp_path):
    broker = start_broker("tls")
    registry = make_registry(broker, {"mqtt": {"tls": {"enabled": True, "ca_file": str(broker.ca_file)}}})
    registry.run("publish", "tiny", *ir_files(build_tiny_ir(tmp_path / "ir")), "--version", "1")
    assert registry.verify(retained_on(mqtt_subscriber, broker, "edged/registry/models/tiny").payload)

    stranger = make_registry(broker, {"mqtt": {"tls": {"enabled": True}}})  # the system CAs do not know it
    files = ir_files(build_tiny_ir(tmp_path / "ir"))
    done = stranger.run("publish", "tiny", *files, "--version", "1", expect=1)
    assert "cannot reach the MQTT broker" in done.stderr and "CERTIFICATE_VERIFY_FAILED" in done.stderr
