"""What every section of the settings tree shares: the error, the section base class,
the machine-dependent default paths, and loading a TOML file under the environment
(also how edged-registry loads its own settings, edged/registry/config.py)."""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

from edged.errors import EdgedError

# The parsed TOML file of the `load_settings` call in progress (a weaker source than the environment).
_file_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("edged_file", default=None)
# False while a client command (`edged models`, `predict`, ...) loads the settings: the rules
# about what the running daemon needs (updates need MQTT, ...) are not that command's business.
_for_daemon: contextvars.ContextVar[bool] = contextvars.ContextVar("edged_for_daemon", default=True)


class ConfigError(EdgedError):
    """The configuration cannot be used; the message names the field."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _systemd_dir(variable: str) -> Path | None:
    """The directory systemd made for the service (RuntimeDirectory= and friends), if any."""
    value = os.environ.get(variable)
    return Path(value.split(":")[0]) if value else None


def default_socket_path() -> Path:
    if runtime := _systemd_dir("RUNTIME_DIRECTORY"):
        return runtime / "edged.sock"
    if _is_root():
        return Path("/run/edged/edged.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/edged-{os.getuid()}")  # noqa: S108
    return base / "edged" / "edged.sock"


def default_data_dir() -> Path:
    if state := _systemd_dir("STATE_DIRECTORY"):
        return state
    if _is_root():
        return Path("/var/lib/edged")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edged"


def default_cache_dir() -> Path:
    if cache := _systemd_dir("CACHE_DIRECTORY"):
        return cache
    if _is_root():
        return Path("/var/cache/edged")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edged"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TomlSettings(BaseSettings):
    """Settings whose TOML file (read by `load_toml_settings`) is weaker than the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, InitSettingsSource(settings_cls, _file_data.get() or {}))


_T = TypeVar("_T", bound=TomlSettings)


def load_toml_settings(cls: type[_T], path: Path | None, default_path: Path, env_prefix: str,
                       what: str, **overrides: Any) -> _T:
    """`cls` from `path` (else `default_path` when present), the environment and `overrides`."""
    if path is None and default_path.exists():
        path = default_path
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    token = _file_data.set(data)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: " + _describe(exc, path, env_prefix)) from None
    except (ValueError, EdgedError) as exc:  # e.g. an environment variable that is not valid JSON
        first = str(exc).splitlines()[0]
        env = re.search(r'field "(\w+)" from source "EnvSettingsSource"', first)
        if env:
            annotation = getattr(cls.model_fields.get(env.group(1)), "annotation", None)
            nested = typing.get_origin(annotation) is dict or (
                isinstance(annotation, type) and issubclass(annotation, BaseModel))
            variable = f"{env_prefix}{env.group(1).upper()}{'__*' if nested else ''}"
            first = (f"the {variable} environment variable cannot be parsed "
                     f"(lists and tables are JSON, e.g. '[\"alice\"]')")
        raise ConfigError(f"invalid {what}: {first}") from None
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError, path: Path | None, env_prefix: str) -> str:
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across sections: its message names the keys
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        field = ".".join(str(p) for p in err["loc"])
        env = env_prefix + "__".join(str(p).upper() for p in err["loc"])
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        parts.append(f"{field}: {err['msg']}{shown} [set in {path or 'defaults'} or {env}]")
    return "; ".join(parts)
