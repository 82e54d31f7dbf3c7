"""Unit tests for the settings tree: defaults < TOML < EDGED_* environment < keyword (CLI) overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged import config
from edged.config import ConfigError, ModelSettings, Settings, load_settings
from edged.errors import EdgedError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No EDGED_* variable of the outer environment, and no /etc/edged/edged.toml, may leak in."""
    for key in list(os.environ):
        if key.startswith("EDGED_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "etc-edged" / "edged.toml")


def write(tmp_path: Path, text: str, name: str = "edged.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults ---------------------------------------------------------------------------
def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = load_settings()
    if os.geteuid() == 0:
        socket_path = Path("/run/edged/edged.sock")
        store_path = Path("/var/lib/edged/models")
        cache = Path("/var/cache/edged/openvino")
    else:
        socket_path = tmp_path / "run" / "edged" / "edged.sock"
        store_path = tmp_path / "data" / "edged" / "models"
        cache = tmp_path / "cache" / "edged" / "openvino"
    assert settings.socket.path == socket_path
    assert settings.store.path == store_path
    assert settings.backends.openvino_cache_dir == cache
    assert settings.socket.group is None
    assert settings.socket.allowed_users == []
    assert settings.socket.allowed_groups == []
    assert settings.socket.max_connections == 8192
    assert settings.socket.max_pending_requests == 64
    assert settings.socket.request_timeout_s == 10.0
    assert settings.socket.idle_timeout_s == 120.0
    assert settings.socket.max_body_bytes == 64 << 20
    assert settings.store.poll_interval_s == 1.0
    assert settings.backends.workers == (os.cpu_count() or 1)
    assert settings.backends.litert_threads == 1
    assert settings.backends.openvino_performance_hint == "LATENCY"
    assert settings.backends.probe_runs == 30
    assert settings.backends.fallback_after_errors == 3
    assert settings.backends.fallback_retry_s == 300.0
    assert settings.models == {}
    assert settings.logging.level == "info"


def test_a_model_without_a_section_gets_default_settings() -> None:
    settings = load_settings()
    assert settings.model("anything") == ModelSettings()
    model = settings.model("anything")
    assert (model.backend, model.precision, model.reject_non_finite) == ("auto", "f32", True)
    assert model.allowed_users == [] and model.allowed_groups == []


# --- the TOML file ------------------------------------------------------------------------
TOML = """
[socket]
path = "/tmp/from-toml.sock"
group = "staff"
max_connections = 5
allowed_users = ["root", "1000"]

[store]
path = "/srv/models"
poll_interval_s = 2.5

[backends]
workers = 3
openvino_performance_hint = "THROUGHPUT"

[models.face]
backend = "litert"
reject_non_finite = false
allowed_groups = ["video"]

[logging]
level = "debug"
"""


def test_toml_values(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TOML))
    assert settings.socket.path == Path("/tmp/from-toml.sock")
    assert settings.socket.group == "staff"
    assert settings.socket.max_connections == 5
    assert settings.socket.allowed_users == ["root", "1000"]
    assert settings.socket.max_pending_requests == 64  # untouched keys keep their default
    assert settings.store.path == Path("/srv/models")
    assert settings.store.poll_interval_s == 2.5
    assert settings.backends.workers == 3
    assert settings.backends.openvino_performance_hint == "THROUGHPUT"
    assert settings.logging.level == "debug"


def test_per_model_section(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TOML))
    assert set(settings.models) == {"face"}
    face = settings.model("face")
    assert face.backend == "litert"
    assert face.reject_non_finite is False
    assert face.allowed_groups == ["video"]
    assert face.precision == "f32"
    assert settings.model("selfie") == ModelSettings()


def test_the_default_config_file_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = write(tmp_path, "[socket]\nmax_connections = 9\n", "default.toml")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", default)
    assert load_settings().socket.max_connections == 9
    # an explicit file wins over the default one, which is then not read at all
    explicit = write(tmp_path, "[store]\npoll_interval_s = 4.0\n", "explicit.toml")
    settings = load_settings(explicit)
    assert settings.store.poll_interval_s == 4.0
    assert settings.socket.max_connections == 8192


def test_an_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).socket.max_connections == 8192


# --- environment over TOML ------------------------------------------------------------
def test_environment_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__MAX_CONNECTIONS", "7")
    monkeypatch.setenv("EDGED_STORE__PATH", "/env/models")
    monkeypatch.setenv("EDGED_LOGGING__LEVEL", "error")
    monkeypatch.setenv("EDGED_SOCKET__ALLOWED_USERS", '["nobody"]')
    settings = load_settings(write(tmp_path, TOML))
    assert settings.socket.max_connections == 7
    assert settings.store.path == Path("/env/models")
    assert settings.logging.level == "error"
    assert settings.socket.allowed_users == ["nobody"]
    # keys only in the file survive next to the variables of the same section
    assert settings.socket.group == "staff"
    assert settings.store.poll_interval_s == 2.5


def test_environment_alone_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_BACKENDS__PROBE_RUNS", "5")
    monkeypatch.setenv("EDGED_STORE__POLL_INTERVAL_S", "0.25")
    settings = load_settings()
    assert settings.backends.probe_runs == 5
    assert settings.store.poll_interval_s == 0.25


def test_environment_sets_per_model_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_MODELS__FACE__PRECISION", "f16")
    monkeypatch.setenv("EDGED_MODELS__SELFIE__BACKEND", "openvino")
    settings = load_settings(write(tmp_path, TOML))
    assert settings.model("face").precision == "f16"
    assert settings.model("face").backend == "litert"  # from the file, kept
    assert settings.model("selfie").backend == "openvino"


# --- keyword overrides over everything ---------------------------------------------------
def test_keyword_overrides_win_over_environment_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGED_SOCKET__PATH", "/env.sock")
    monkeypatch.setenv("EDGED_SOCKET__MAX_CONNECTIONS", "7")
    settings = load_settings(
        write(tmp_path, TOML), socket={"path": "/flag.sock"}, store={"path": "/flag/models"}
    )
    assert settings.socket.path == Path("/flag.sock")
    assert settings.store.path == Path("/flag/models")
    assert settings.socket.max_connections == 7  # from the environment
    assert settings.socket.group == "staff"  # from the file
    assert settings.store.poll_interval_s == 2.5  # from the file


def test_keyword_override_of_a_value_set_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__MAX_CONNECTIONS", "7")
    settings = load_settings(write(tmp_path, TOML), socket={"max_connections": 9})
    assert settings.socket.max_connections == 9


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TOML), socket=None, store=None)
    assert settings.socket.path == Path("/tmp/from-toml.sock")
    assert settings.store.path == Path("/srv/models")


# --- invalid values -----------------------------------------------------------------------
def test_an_invalid_environment_value_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__MAX_CONNECTIONS", "0")
    message = config_error()
    assert message.startswith("invalid configuration: ")
    assert "socket.max_connections" in message
    assert "EDGED_SOCKET__MAX_CONNECTIONS" in message
    assert "'0'" in message


def test_a_non_number_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__REQUEST_TIMEOUT_S", "soon")
    message = config_error()
    assert "socket.request_timeout_s" in message
    assert "EDGED_SOCKET__REQUEST_TIMEOUT_S" in message


def test_an_invalid_toml_value_names_field_file_and_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[socket]\nmax_connections = 100000\n")
    message = config_error(path)
    assert "socket.max_connections" in message
    assert str(path) in message
    assert "EDGED_SOCKET__MAX_CONNECTIONS" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[store]\npoll_interval_s = 0\n', "store.poll_interval_s"),
        ('[socket]\nmax_body_bytes = 10\n', "socket.max_body_bytes"),
        ('[socket]\nallowed_users = "root"\n', "socket.allowed_users"),
        ('[backends]\nworkers = 0\n', "backends.workers"),
        ('[backends]\nopenvino_performance_hint = "FAST"\n', "backends.openvino_performance_hint"),
        ('[logging]\nlevel = "trace"\n', "logging.level"),
        ('[models.face]\nbackend = "tpu"\n', "models.face.backend"),
        ('[models.face]\nprecision = "int8"\n', "models.face.precision"),
        ('socket = 3\n', "socket"),
    ],
)
def test_invalid_toml_values(tmp_path: Path, text: str, field: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"{field}: " in message
    assert "EDGED_" + field.upper().replace(".", "__") in message


def test_an_invalid_keyword_override_names_the_field() -> None:
    message = config_error(socket={"max_connections": -1})
    assert "socket.max_connections" in message


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[socket]\nmax_connections = 0\n[logging]\nlevel = 'x'\n"))
    assert "socket.max_connections" in message
    assert "logging.level" in message


def test_an_environment_list_that_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__ALLOWED_USERS", "[root")
    message = config_error()
    assert message.startswith("invalid configuration: ")
    assert "EDGED_SOCKET__" in message and "JSON" in message


@pytest.mark.parametrize("name", ["bad/name", "..", ".hidden", "-x"])
def test_an_invalid_model_section_name(tmp_path: Path, name: str) -> None:
    message = config_error(write(tmp_path, f'[models."{name}"]\nbackend = "litert"\n'))
    assert repr(name) in message


def test_config_error_is_an_edged_error() -> None:
    assert issubclass(ConfigError, EdgedError)


# --- unknown keys ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[socket]\nbogus = 1\n", "socket.bogus"),
        ("max_connections = 5\n", "max_connections"),
        ("[sockets]\npath = '/x'\n", "sockets"),
        ("[models.face]\nbackend = 'auto'\nthreads = 4\n", "models.face.threads"),
        ("[logging]\nformat = 'json'\n", "logging.format"),
    ],
)
def test_unknown_toml_keys_are_refused(tmp_path: Path, text: str, field: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"{field}: Extra inputs are not permitted" in message


def test_an_unknown_key_in_a_section_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_SOCKET__MAX_CONECTIONS", "5")
    message = config_error()
    assert "socket.max_conections: Extra inputs are not permitted" in message
    assert "EDGED_SOCKET__MAX_CONECTIONS" in message


def test_an_unknown_keyword_override_is_refused() -> None:
    assert "socket.bogus" in config_error(socket={"bogus": 1})


# --- unusable files -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["[socket\npath = 1\n", "path = \n", "a = 1\na = 2\n", "[socket]\nx = 'unterminated\n"]
)
def test_invalid_toml_is_one_line_with_the_file_name(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line" in message


def test_a_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert config_error(path) == f"{path}: no such config file"


def test_a_config_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00[socket]")
    assert config_error(path).startswith(f"{path}: cannot read: ")


def test_a_directory_as_config_file(tmp_path: Path) -> None:
    assert config_error(tmp_path).startswith(f"{tmp_path}: cannot read: ")


def test_settings_refuse_invalid_assignment() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="max_connections"):
        settings.socket.max_connections = 0


def test_mqtt_settings_from_toml_and_nested_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edged.toml"
    path.write_text('[mqtt]\nenabled = true\nhost = "broker"\ndevice_id = "door-17"\npassword = "s3cret"\n'
                    '[mqtt.tls]\nenabled = true\n')
    monkeypatch.setenv("EDGED_MQTT__TLS__CA_FILE", "/etc/edged/ca.pem")
    mqtt = load_settings(path).mqtt
    assert (mqtt.host, mqtt.device_id, mqtt.tls.enabled) == ("broker", "door-17", True)
    assert mqtt.tls.ca_file == Path("/etc/edged/ca.pem")
    assert "s3cret" not in repr(mqtt) and mqtt.password.get_secret_value() == "s3cret"


def test_the_default_device_id_is_a_valid_topic_level() -> None:
    assert config.DEVICE_ID.fullmatch(Settings().mqtt.device_id)


@pytest.mark.parametrize("device_id", ["", "a/b", "cam+1", "#", "-lead", "x" * 65, "caméra"])
def test_a_device_id_that_is_no_topic_level_is_refused(device_id: str) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.device_id"):
        load_settings(None, mqtt={"device_id": device_id})


def test_a_topic_prefix_with_wildcards_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.topic_prefix"):
        load_settings(None, mqtt={"topic_prefix": "edged/#"})
