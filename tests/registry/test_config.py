"""The registry's settings: file, environment, defaults, and the errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.config import ConfigError
from edged.registry.config import RegistrySettings, load_registry_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("EDGED_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    settings = load_registry_settings(write(tmp_path, ""))
    as_user = tmp_path / "data" / "edged-registry"
    assert settings.root == (Path("/var/lib/edged-registry") if os.geteuid() == 0 else as_user)
    assert (settings.topic_prefix, settings.max_chunk_bytes, settings.release_days) == ("edged", 1 << 20, 30)
    assert settings.mqtt.device_id == "edged-registry" and settings.mqtt.protocol == "5"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert load_registry_settings(write(tmp_path, "")).root == tmp_path / "state"
    assert all(field.description for field in RegistrySettings.model_fields.values())


def test_file_and_environment(monkeypatch, tmp_path):
    path = write(tmp_path, 'root = "/srv/reg"\nserve_threads = 8\n[mqtt]\nhost = "broker.lan"\nport = 8883\n')
    settings = load_registry_settings(path)
    assert settings.root == Path("/srv/reg") and settings.serve_threads == 8
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.device_id) == ("broker.lan", 8883,
                                                                                 "edged-registry")
    monkeypatch.setenv("EDGED_REGISTRY_MQTT__DEVICE_ID", "registry-2")
    monkeypatch.setenv("EDGED_REGISTRY_SERVE_THREADS", "2")
    settings = load_registry_settings(path)
    assert (settings.mqtt.device_id, settings.mqtt.host, settings.serve_threads) == \
        ("registry-2", "broker.lan", 2)


def test_one_topic_prefix(tmp_path):
    assert load_registry_settings(write(tmp_path, '[mqtt]\ntopic_prefix = "site1"\n')).topic_prefix == "site1"
    with pytest.raises(ConfigError, match="differ"):
        load_registry_settings(write(tmp_path, 'topic_prefix = "a"\n[mqtt]\ntopic_prefix = "b"\n'))


@pytest.mark.parametrize(("text", "words"), [
    ("max_chunk_bytes = 100\n", "EDGED_REGISTRY_MAX_CHUNK_BYTES"),
    ("release_days = 0\n", "release_days"),
    ("serve_threads = 0\n", "serve_threads"),
    ('topic_prefix = "a/#"\n', "topic_prefix"),
    ("[mqtt]\nport = 0\n", "EDGED_REGISTRY_MQTT__PORT"),
    ('[mqtt]\nprotocol = "3.1.1"\n', "MQTT 5"),
    ("surprise = 1\n", "surprise"),
])
def test_errors_name_the_field(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as caught:
        load_registry_settings(write(tmp_path, text))
    assert "\n" not in str(caught.value)


def test_the_share_group_is_on_by_default_and_empty_turns_it_off(tmp_path):
    assert load_registry_settings(write(tmp_path, "")).share_group == "edged-registry"
    assert load_registry_settings(write(tmp_path, 'share_group = ""\n')).share_group == ""
    with pytest.raises(ConfigError, match="share_group"):
        load_registry_settings(write(tmp_path, 'share_group = "a/b"\n'))  # a topic level, no wildcards
