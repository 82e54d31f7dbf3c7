"""Generate docs/configuration.md and packaging/edged.toml from the settings tree in edged/config/.

Every table row and every commented key comes from `Settings.model_fields`: the
TOML key, the environment variable, the type (with its bounds), the default and
the Field description. Only the few defaults that depend on the machine (paths
that differ for root, the CPU count) are explained by hand, in MACHINE_DEFAULTS.

    .venv/bin/python tools/gen_config_docs.py           # write both files
    .venv/bin/python tools/gen_config_docs.py --check   # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edged.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
PACKAGED = ROOT / "packaging" / "edged.toml"
ENV_PREFIX = "EDGED_"
EXAMPLE_MODEL = "face"  # the name the packaged file uses for its commented [models.<name>] table

# Defaults that depend on the machine or the user running edged: the rule (Markdown) and the
# value the packaged file shows. Keyed by field path. The packaged file is read by a daemon
# running as root, so paths show the root default; the CPU count is only an example.
AS_ROOT = "The value below is what edged uses as root."
MACHINE_DEFAULTS: dict[str, tuple[str, Any, str]] = {
    "socket.path": (
        "`$RUNTIME_DIRECTORY/edged.sock` under systemd, "
        "`/run/edged/edged.sock` as root, `$XDG_RUNTIME_DIR/edged/edged.sock` otherwise "
        "(`/tmp/edged-<uid>/edged/edged.sock` when `XDG_RUNTIME_DIR` is unset)",
        "/run/edged/edged.sock", AS_ROOT,
    ),
    "mqtt.device_id": (
        "the host name (characters a topic level cannot hold become `-`)", "camera-17",
        "The value below is an example.",
    ),
    "mqtt.outbox_path": (
        "`$STATE_DIRECTORY/outbox.db` under systemd, `/var/lib/edged/outbox.db` as root, "
        "`$XDG_DATA_HOME/edged/outbox.db` otherwise",
        "/var/lib/edged/outbox.db", AS_ROOT,
    ),
    "updates.download_dir": (
        "`$STATE_DIRECTORY/downloads` under systemd, `/var/lib/edged/downloads` as root, "
        "`$XDG_DATA_HOME/edged/downloads` otherwise",
        "/var/lib/edged/downloads", AS_ROOT,
    ),
    "store.path": (
        "`$STATE_DIRECTORY/models` under systemd, "
        "`/var/lib/edged/models` as root, `$XDG_DATA_HOME/edged/models` otherwise "
        "(`XDG_DATA_HOME` defaults to `~/.local/share`)",
        "/var/lib/edged/models", AS_ROOT,
    ),
    "backends.openvino_cache_dir": (
        "`$CACHE_DIRECTORY/openvino` under systemd, "
        "`/var/cache/edged/openvino` as root, `$XDG_CACHE_HOME/edged/openvino` otherwise "
        "(`XDG_CACHE_HOME` defaults to `~/.cache`)",
        "/var/cache/edged/openvino", AS_ROOT,
    ),
    "backends.workers": ("the number of CPUs (`os.cpu_count()`)", 4, "The value below is an example."),
}
# Keys that are unset by default, with a value the packaged file shows as an example.
EXAMPLES: dict[str, Any] = {
    "socket.group": "edged",
    "pipelines.model": "face",
    "mqtt.username": "camera-17",
    "updates.group": "pilot",
    "mqtt.password": "change-me",
    "mqtt.password_file": "/etc/edged/mqtt-password",
    "mqtt.tls.ca_file": "/etc/edged/mqtt-ca.pem",
    "mqtt.tls.cert_file": "/etc/edged/mqtt-client.pem",
    "mqtt.tls.key_file": "/etc/edged/mqtt-client.key",
    "pipelines.source.uri": "/dev/video0",
    "pipelines.sinks.path": "/var/lib/edged/results/door.jsonl",
    "homeassistant.device_name": "Front door camera",
    "models.device": "GPU",
    "models.delegate.library": "libedgetpu.so.1",
}
# The names the packaged file uses for its commented per-name tables.
EXAMPLE_NAMES = {"models": "face", "pipelines": "door"}


@dataclass(frozen=True)
class Key:
    name: str
    env: str
    type: str
    default: str  # Markdown
    toml_value: str  # what the packaged file shows after `name = `
    example_note: str  # a sentence saying why the packaged value is not the default ("" when it is)
    description: str


@dataclass(frozen=True)
class Section:
    table: str  # the TOML table: "socket", or "models.<name>"
    description: str
    keys: list[Key]


# --- reading the settings tree ------------------------------------------------------------------

def sections() -> list[Section]:
    found = []
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_nested(name, annotation, name, f"{ENV_PREFIX}{name.upper()}__", field))
            continue
        args = typing.get_args(annotation)
        if (typing.get_origin(annotation) is dict and len(args) == 2
                and isinstance(args[1], type) and issubclass(args[1], BaseModel)):
            found.extend(_nested(f"{name}.<name>", args[1], name,
                                 f"{ENV_PREFIX}{name.upper()}__<NAME>__", field))
            continue
        raise TypeError(f"Settings.{name}: only sections and dicts of sections are documented; "
                        f"teach tools/gen_config_docs.py about {annotation}")
    return found


def _nested(table: str, model: type[BaseModel], path: str, env_prefix: str,
            field: FieldInfo) -> list[Section]:
    """A table, then one table per sub-model field and an array of tables per list of models."""
    found = [_section(table, model, path, env_prefix, field)]
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = typing.get_args(annotation)
        if (sub := _model_of(annotation)) is not None:
            found.extend(_nested(f"{table}.{name}", sub, f"{path}.{name}",
                                 f"{env_prefix}{name.upper()}__", info))
        elif typing.get_origin(annotation) is list and args and isinstance(args[0], type) \
                and issubclass(args[0], BaseModel):
            found.append(_section(f"[{table}.{name}]", args[0], f"{path}.{name}", "", info))
    return found


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, also when it is optional (`DelegateSettings | None`)."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = others[0] if len(others) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_table(info: FieldInfo) -> bool:
    annotation, args = info.annotation, typing.get_args(info.annotation)
    if _model_of(annotation) is not None:
        return True
    return typing.get_origin(annotation) is list and bool(args) and isinstance(args[0], type) \
        and issubclass(args[0], BaseModel)


def _section(table: str, model: type[BaseModel], path: str, env_prefix: str, field: FieldInfo) -> Section:
    keys = []
    for name, info in model.model_fields.items():
        if _is_table(info):
            continue  # documented as its own table
        if not info.description:
            raise ValueError(f"{path}.{name} has no description in edged/config/")
        default, toml_value, note = _default(f"{path}.{name}", name, info)
        env = f"{env_prefix}{name.upper()}" if env_prefix else "(file only)"
        keys.append(Key(name, env, type_name(info.annotation, info.metadata),
                        default, toml_value, note, info.description))
    return Section(table, field.description or "", keys)


def _default(path: str, name: str, info: FieldInfo) -> tuple[str, str, str]:
    """Markdown default, the packaged file's value, and a note when that value is only an example."""
    if path in MACHINE_DEFAULTS:
        rule, value, note = MACHINE_DEFAULTS[path]
        return rule, toml_value(value), note
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        if path not in EXAMPLES:
            raise ValueError(f"{path} is required: add an example value to EXAMPLES")
        return "required", toml_value(EXAMPLES[path]), "The value below is an example."
    else:
        value = info.default
    if value is None:
        if path not in EXAMPLES:
            raise ValueError(f"{path} defaults to unset: add an example value to EXAMPLES")
        return "unset", toml_value(EXAMPLES[path]), "The value below is an example."
    shown = f"`{toml_value(value)}`"
    if name.endswith("_bytes") and isinstance(value, int):
        shown += f" ({_human_bytes(value)})"
    return shown, toml_value(value), ""


def type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (types.UnionType, typing.Union):
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return f"{type_name(others[0], metadata)} (optional)"
    if origin is list and len(args) == 1:
        return f"list of {type_name(args[0])}s"
    if origin is dict and len(args) == 2 and args[0] is str:
        return f"table of {type_name(args[1])}s"
    names = {bool: "boolean", str: "string", int: "integer", float: "number", Path: "path",
             SecretStr: "secret string"}
    if annotation not in names:
        raise TypeError(f"teach tools/gen_config_docs.py how to name {annotation}")
    return names[annotation] + _bounds(metadata or [])


def _bounds(metadata: list[Any]) -> str:
    low = high = ""
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{item.ge} ≤ "
        elif isinstance(item, annotated_types.Gt):
            low = f"{item.gt} < "
        elif isinstance(item, annotated_types.Le):
            high = f" ≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f" < {item.lt}"
    if low and not high:  # "x > 0" reads better than "0 < x"
        bound, op = low[:-3], {"≤": "≥", "<": ">"}[low[-2]]
        return f", x {op} {bound}"
    return f", {low}x{high}" if low or high else ""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _human_bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} bytes"


# --- docs/configuration.md ----------------------------------------------------------------------

INTRO = """\
# Configuration

<!-- Generated by tools/gen_config_docs.py from edged/config/: edit the Field descriptions
     there and run `.venv/bin/python tools/gen_config_docs.py`; do not edit this file by hand. -->

edged has one settings tree (`edged/config/`). Every key can be set in a TOML file or in an
environment variable, and a few have command-line flags. The file is read at start-up and
again on `SIGHUP` (`systemctl reload edged`, or the `config.reload` MQTT command): a reload
applies `[[pipelines]]` and `[logging]` at once, logs which other sections changed and need a
restart, and changes nothing when the new file is invalid.

## Sources and precedence

Strongest first; each key is resolved on its own, so an environment variable overrides one key
of a file's table and leaves the table's other keys as the file sets them.

1. **Command-line flags.** `--socket PATH` sets `socket.path` (`edged run`, `predict`, `status`);
   `--store DIR` sets `store.path` (`edged run`, `edged models ...`). `--config FILE` chooses the
   TOML file (it is an error if `FILE` does not exist).
2. **Environment variables** named `EDGED_<SECTION>__<KEY>` (two underscores between the parts),
   e.g. `EDGED_SOCKET__MAX_CONNECTIONS=16`.
3. **The TOML file** given by `--config`, else `/etc/edged/edged.toml` when it exists. No file is
   needed: without one, edged runs on the defaults. `packaging/edged.toml` is a copy of every key,
   commented out, with its description and default.
4. **The defaults** listed below.

## Environment variables

- Names are case-insensitive: `EDGED_SOCKET__MAX_CONNECTIONS` and `edged_socket__max_connections`
  are the same variable.
- Numbers, strings and paths are given as plain text; booleans as `true` or `false`.
- Lists are given as JSON: `EDGED_SOCKET__ALLOWED_USERS='["alice", "1001"]'`. A value that is not
  valid JSON is a configuration error.
- Variables that start with `EDGED_` but do not name a section (such as `EDGED_SAMPLES_DIR`, used by
  the development tools) are ignored.

## Per-model settings

Each model may have its own table, `[models.<name>]` in the file, or variables named
`EDGED_MODELS__<NAME>__<KEY>`:

```toml
[models.face]
backend = "litert"
allowed_groups = ["video"]
```

```sh
EDGED_MODELS__FACE__BACKEND=litert
```

A model without a table uses the defaults of the `[models.<name>]` section below. Because
environment variable names are case-insensitive, `EDGED_MODELS__FACE__...` configures the model
`face`; a model whose name has capitals (`Face`) can only be configured in the file. Model names
follow the store's rule (letters, digits, `.`, `_` and `-`, starting with a letter or a digit); a
name holding a `.` must be quoted in TOML: `[models."face.v2"]`.

## Errors and checking

Unknown keys are errors, in the file and in the variables of a known section
(`EDGED_SOCKET__MAX_CONECTIONS` is refused, not ignored), as is a value of the wrong type or out of
bounds. The message names the key, the file and the variable that could have set it, and `edged`
exits with status 2. `edged run --check` loads the configuration, resolves the allowed user and
group names, loads every active model and exits: 0 when every model loads, 1 otherwise.

Keys ending in `_s` are seconds; keys ending in `_bytes` are bytes.
"""


def render_markdown() -> str:
    parts = [INTRO]
    for section in sections():
        parts.append(f"\n## `[{section.table}]`\n\n{section.description}\n\n")
        parts.append("| TOML key | Environment variable | Type | Default | Description |\n")
        parts.append("|---|---|---|---|---|\n")
        for key in section.keys:
            cells = [f"`{key.name}`", f"`{key.env}`", key.type, key.default, key.description]
            parts.append("| " + " | ".join(_cell(c) for c in cells) + " |\n")
    return "".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- packaging/edged.toml -----------------------------------------------------------------------

TOML_HEADER = """\
# edged configuration: installed as /etc/edged/edged.toml.
#
# Every key is commented out and shows its default, so this file changes nothing
# as shipped. To change a key, uncomment its table header ("#[socket]" becomes
# "[socket]") and the key. Environment variables EDGED_<SECTION>__<KEY> override
# this file, and the command-line flags --socket and --store override both.
# Restart edged to apply a change; `edged run --check` validates it first.
#
# Generated by tools/gen_config_docs.py from edged/config/; the reference with
# every environment variable is docs/configuration.md.
"""


def render_toml() -> str:
    lines = [TOML_HEADER.rstrip("\n")]
    for section in sections():
        top = section.table.strip("[").split(".")[0]
        table = section.table.replace("<name>", EXAMPLE_NAMES.get(top, EXAMPLE_MODEL))
        lines.append("")
        lines.append(f"#[{table}]")
        lines.extend(_comment(_plain(section.description)))
        if section.table != table and top == "models" and section.table.count(".") == 1:
            lines.extend(_comment(
                f"One table per model; \"{EXAMPLE_MODEL}\" stands for the model's name as the store "
                "lists it. A model without a table uses these defaults."
            ))
        elif section.table != table and section.table.count(".") == 1:
            lines.extend(_comment(f"One table per {top[:-1]}; \"{EXAMPLE_NAMES[top]}\" is its name."))
        for key in section.keys:
            lines.append("#")
            lines.extend(_comment(_plain(key.description)))
            note = f" {key.example_note}" if key.example_note else ""
            lines.extend(_comment(f"Default: {_plain(key.default)}.{note}"))
            lines.append(f"#{key.name} = {key.toml_value}")
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width=86, break_on_hyphens=False)]


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


# --- entry point ----------------------------------------------------------------------------------

def render() -> dict[Path, str]:
    return {DOCS: render_markdown(), PACKAGED: render_toml()}


def stale_files() -> list[Path]:
    """The generated files whose content differs from what this tool would write."""
    stale = []
    for path, text in render().items():
        try:
            current = path.read_text()
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the configuration reference and default file.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run .venv/bin/python tools/gen_config_docs.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
