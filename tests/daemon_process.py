"""Child processes for the tests, and waiting until something holds: written once for the
tests (conftest's `start_daemon` fixtures, the registry's `serve`) and for tools/ (the
benchmarks). `ChildProcess` is any command with its output in a log file; `DaemonProcess`
is `edged run` on top of it.

Plain Python, no pytest, so a tool imports it with the repository on `sys.path`
(`from tests.daemon_process import DaemonProcess`). Failures raise AssertionError with
what was awaited and the daemon's output, as pytest shows them; never a bare `assert`,
so `python -O` keeps the checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edged.client import Client


def wait_until(predicate: Callable[[], object], timeout: float = 60.0,
               what: str | Callable[[], object] = "condition", interval: float = 0.02) -> object:
    """Poll `predicate` until it is true and return its value; after `timeout` seconds raise
    AssertionError naming `what` (a callable is called then, to describe the state at the end)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            awaited = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {awaited}")
        time.sleep(interval)
    return value


def to_toml(data: dict, prefix: str = "") -> str:
    """Just enough TOML for test configs: tables, strings, numbers, booleans, lists."""
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((f"{prefix}{key}", value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.extend((f"{prefix}{key}", item) for item in value)
        else:
            scalars.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    text = "\n".join(scalars) + "\n"
    for name, table in tables:
        text += f"\n[{name}]\n" + to_toml(table, f"{name}.")
    for name, table in arrays:
        text += f"\n[[{name}]]\n" + to_toml(table, f"{name}.")
    return text


def environment(extra: dict | None = None) -> dict[str, str]:
    """This process's environment without its EDGED_* variables (a config file decides), plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")} | (extra or {})


class ChildProcess:
    """`command` in a subprocess, stdout and stderr in `log_path` (truncated first); `name`
    says what it is in failures."""

    def __init__(self, command: list[str], log_path: Path, *, name: str = "child process",
                 env: dict | None = None, cwd: Path | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     pass_fds=pass_fds)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self) -> None:
        """AssertionError with the output if it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition",
                 interval: float = 0.02) -> object:
        """`wait_until(predicate)` while it runs: fails at once if it exits, and with its output
        on a timeout."""
        def check() -> object:
            self.check_running()
            return predicate()

        return wait_until(check, timeout, lambda: f"{what}:\n{self.output()}", interval)

    def kill(self) -> int:
        """SIGKILL: gone at once, no goodbye; its exit code."""
        self.proc.kill()
        return self.proc.wait()

    def stop(self, timeout: float = 20.0, *, must_exit: bool = False) -> int:
        """SIGTERM (and SIGCONT, should a test have stopped it), then SIGKILL if it has not
        exited after `timeout` s; its exit code. `must_exit`: needing the SIGKILL is an
        AssertionError (raised after the kill)."""
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if killed and must_exit:
            raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM:\n{self.output()}")
        return self.proc.returncode


class DaemonProcess(ChildProcess):
    """`edged run --config workdir/edged.toml` in a subprocess, stdout and stderr in
    workdir/daemon.log; `settings` must name the socket path. EDGED_* variables of this
    process are not passed on (the config file decides), `env` is added."""

    def __init__(self, workdir: Path, settings: dict, env: dict | None = None, *,
                 launcher: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.workdir = workdir
        self.socket = Path(settings["socket"]["path"])
        self.config_path = workdir / "edged.toml"
        self.config_path.write_text(to_toml(settings))
        self.ready_s: float | None = None  # seconds from spawn to ready, once wait_ready saw it
        super().__init__(  # launcher: what runs `-m edged run ...` (default: this Python)
            [*(launcher or [sys.executable]), "-m", "edged", "run", "--config", str(self.config_path)],
            workdir / "daemon.log", name="daemon", env=environment(env), cwd=workdir, pass_fds=pass_fds)

    def __enter__(self) -> DaemonProcess:
        return self

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with Client(self.socket, timeout=5) as client:
                return client.ready()
        except OSError:
            return False
        except Exception as exc:  # not accepting yet
            if "cannot connect" not in str(exc):
                raise
            return False

    def wait_ready(self, timeout: float = 60.0) -> DaemonProcess:
        """Return once /v2/health/ready says ready; fail at once if the daemon exits."""
        self.wait_for(self._ready, timeout, "the daemon to be ready")
        self.ready_s = time.monotonic() - self.started
        return self

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def predicting(self, model: str, inputs: dict[str, np.ndarray], clients: int = 1) -> PredictLoad:
        """`with daemon.predicting(...) as load:` clients keep predicting until the block ends."""
        return PredictLoad(self, model, inputs, clients)


class PredictLoad:
    """Socket clients predicting in threads; every answer's first output value and every
    failure is kept, so a test can say "zero failed requests" about what happened meanwhile."""

    def __init__(self, daemon: DaemonProcess, model: str, inputs: dict[str, np.ndarray],
                 clients: int) -> None:
        self.answers: list[float] = []
        self.failures: list[str] = []
        self._daemon, self._model, self._inputs = daemon, model, inputs
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._predict) for _ in range(clients)]

    def _predict(self) -> None:
        with self._daemon.client() as client:
            while not self._stop.is_set():
                try:
                    outputs = client.infer(self._model, self._inputs)
                    self.answers.append(float(next(iter(outputs.values())).flat[0]))
                except Exception as exc:  # every failure counts
                    self.failures.append(repr(exc))

    def __enter__(self) -> PredictLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
