"""The generated configuration docs are current, and the packaged config file is usable."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tomllib
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from edged.config import ModelSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "packaging" / "edged.toml"
# A commented-out table header or key ("#[socket]", "#max_connections = 64"); descriptions start "# ".
COMMENTED_OUT = re.compile(r"^#(?=\[|[A-Za-z0-9_]+ = )")


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(autouse=True)
def no_edged_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGED_* variables would override what the file says."""
    for name in [n for n in os.environ if n.upper().startswith("EDGED_")]:
        monkeypatch.delenv(name)


def _blocks() -> dict[str, str]:
    """The packaged file cut at its commented table headers, each block uncommented."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in PACKAGED.read_text().splitlines():
        if line.startswith("#["):
            current = blocks.setdefault(line[2:-1], [])
        if current is not None:
            current.append(COMMENTED_OUT.sub("", line))
    return {table: "\n".join(lines) + "\n" for table, lines in blocks.items()}


def test_generated_files_are_current() -> None:
    stale = gen.stale_files()
    assert not stale, f"stale: {[str(p) for p in stale]}; run .venv/bin/python tools/gen_config_docs.py"
    assert gen.main(["--check"]) == 0


def test_packaged_file_changes_nothing_as_shipped() -> None:
    assert tomllib.loads(PACKAGED.read_text()) == {}


def test_packaged_file_has_every_section() -> None:
    assert {table.strip("[").split(".")[0] for table in _blocks()} == set(Settings.model_fields)


def test_a_pipeline_loads_from_its_uncommented_tables(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text("".join(text for table, text in _blocks().items() if "pipelines." in table))
    pipeline = load_settings(path).pipelines["door"]
    assert pipeline.model == "face" and pipeline.source.uri == "/dev/video0"
    assert [str(sink.path) for sink in pipeline.sinks] == ["/var/lib/edged/results/door.jsonl"]


def _is_section(annotation: object) -> bool:
    return gen._model_of(annotation) is not None  # an optional section too ([models.face.delegate])


@pytest.mark.parametrize("table", sorted(t for t in _blocks() if "pipelines." not in t))
def test_each_section_loads_when_uncommented(table: str, tmp_path: Path) -> None:
    """Each table holds every key of its section, loads, and shows the defaults as they are."""
    text = _blocks()[table]
    path = tmp_path / "edged.toml"
    path.write_text(text)
    data, settings = tomllib.loads(text), load_settings(path)
    model_class: type[BaseModel] = Settings
    loaded: object = settings
    dotted = []
    for part in table.split("."):  # "mqtt.tls", or "models.face" (a name under a dict of sections)
        data = data[part]
        if isinstance(loaded, dict):
            loaded = loaded[part]
            continue
        dotted.append(part)
        model_class = type(loaded).model_fields[part].annotation
        loaded = getattr(loaded, part)
        if not _is_section(model_class):  # dict[str, ModelSettings]: the next part is a name
            model_class = typing.get_args(model_class)[1]
        model_class = gen._model_of(model_class)
    fields = model_class.model_fields
    # sub-sections are their own blocks; an inline table (options = {}) is a key
    keys = {k for k in data if k not in fields or not _is_section(fields[k].annotation)}
    expected = {k for k, f in model_class.model_fields.items() if not _is_section(f.annotation)}
    assert keys == expected, "every key appears in the packaged file"
    for key in keys:  # field by field: a section with a required key has no defaults as a whole
        if ".".join([*dotted, key]) not in gen.MACHINE_DEFAULTS | gen.EXAMPLES:
            default = model_class.model_fields[key].get_default(call_default_factory=True)
            assert getattr(loaded, key) == default, f"{table}.{key} shows its default"


def test_whole_file_loads_when_uncommented(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text("".join(_blocks().values()))
    examples = {"device": gen.EXAMPLES["models.device"],  # unset by default: the file shows an example
                "delegate": {"library": gen.EXAMPLES["models.delegate.library"]}}
    assert load_settings(path).model(gen.EXAMPLE_MODEL) == ModelSettings(**examples)
