"""OpenVINO's telemetry stays off: no edged program writes `intel/openvino_ga_cid` or usage
counts under its home (under systemd, the daemon user's state directory), so none has
anything to send. Real programs, each with HOME and XDG_CONFIG_HOME pointed at an empty
directory: a daemon serving an OpenVINO model and answering inferences, `edged run --check`,
and `edged-registry publish`, which loads the model for its self-test.

A bare `import openvino` does write there (and sends an "import" event): that is not run
here, as it would phone home from the test machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.registry.store import RegistryStore
from tests.conftest import ir_files, to_toml
from tests.registry.conftest import Registry

X = np.array([[1, 2, -3, 0.5]], np.float32)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def home_env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def left_in(home: Path) -> list[str]:
    return sorted(str(path.relative_to(home)) for path in home.rglob("*"))


def test_importing_edged_leaves_openvino_its_no_op_telemetry(home):
    code = ("import edged.backends.openvino, sys\n"
            "from openvino.tools.ovc import telemetry_utils\n"
            "print(sys.modules['openvino_telemetry'], telemetry_utils.tm.__name__)")
    env = {**os.environ, **home_env(home)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    assert done.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub"]
    assert left_in(home) == []


def test_a_daemon_serving_an_openvino_model_writes_nothing_home(start_daemon, tiny_store, home):
    daemon = start_daemon(tiny_store.root, env=home_env(home))
    with daemon.client() as client:
        assert client.status()["models"]["tiny"]["backend"] == "openvino"
        for _ in range(5):
            np.testing.assert_allclose(client.infer("tiny", {"x": X})["y"], [[3, 5, 0, 2]])
    assert daemon.stop() == 0
    assert left_in(home) == [], daemon.output()


def test_run_check_writes_nothing_home(tiny_store, home, tmp_path):
    config = tmp_path / "edged.toml"
    config.write_text(to_toml({"store": {"path": str(tiny_store.root)},
                               "backends": {"openvino_cache_dir": str(tmp_path / "cache")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")} | home_env(home)
    done = subprocess.run([sys.executable, "-m", "edged", "run", "--check", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "tiny: ready: 1 on openvino" in done.stdout, done.stdout + done.stderr
    assert left_in(home) == []


def test_registry_publish_with_its_self_test_writes_nothing_home(broker, tiny_ir, home, tmp_path):
    workdir = tmp_path / "registry"
    workdir.mkdir()
    registry = Registry(workdir, broker)
    RegistryStore(registry.root).create_key()
    registry.env.update(home_env(home))
    done = registry.run("publish", "tiny", *ir_files(tiny_ir), "--version", "1")
    assert "published tiny 1" in done.stdout
    assert left_in(home) == []
