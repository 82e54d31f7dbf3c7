"""How the daemon is told to stop and how it stops: the signals, a wait for start-up work
that a stop cuts short (`run_until_stop`), and the guarded stop steps (`run_steps`).

Signals are caught from the first moment of `edged run` (before the config is read, the
locks taken or a model loaded). The C-level handler writes the signal's number to a pipe
(`signal.set_wakeup_fd`) and a thread reads it, so a signal is seen even while the main
thread is inside a runtime call that does not return (a model compiling). The first
SIGTERM or SIGINT asks for a stop; a second one, while the stop runs, ends the process at
once (exit 128 + the signal's number: 143, or 130 for Ctrl-C), after one log line.
Whatever ends the process that way first runs the `before_exit` hooks (the daemon's
removes the attempt records of loads it leaves behind: a stop is not a crash).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("edged")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# TEST-ONLY: the name of a stop step ("pipelines", "socket", "mqtt", "models", ...). That
# step raises instead of running, so tests/test_shutdown.py can show that the steps after
# it still run; no real part fails on demand. Never set it on a device.
TEST_FAIL_STOP_VARIABLE = "EDGED_TEST_FAIL_STOP_STEP"


class Signals:
    """What the signals asked for: `stop` (an Event), reloads (`take_reload`), and a wake-up
    for the main loop (`wait`). A second stop signal exits the process from here
    (`exit_now`, after the `before_exit` hooks)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.before_exit: list[Callable[[], object]] = []  # run by exit_now, each guarded
        self._reloads = 0
        self._news = threading.Event()  # something changed: the main loop looks again
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd needs it; a full pipe drops a byte

    @classmethod
    def install(cls) -> Signals:
        """Catch SIGTERM, SIGINT and SIGHUP from now on (only from the main thread)."""
        signals = cls()
        signal.set_wakeup_fd(signals._write, warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            # The Python handler does nothing: the reader thread acts on the number the C
            # handler wrote, whatever the main thread is doing.
            signal.signal(signum, lambda signum, frame: None)
        threading.Thread(target=signals._reader, name="signals", daemon=True).start()
        return signals

    def _reader(self) -> None:
        while True:
            for signum in os.read(self._read, 64):
                self.received(signum)

    def received(self, signum: int) -> None:
        """Act on one signal: ask for a stop, force the exit on a second, or count a reload."""
        if signum in STOP_SIGNALS:
            if self.stop.is_set():
                self.exit_now(128 + signum, f"second {signal.Signals(signum).name} while stopping: "
                              "exiting now")
            self.stop.set()
            log.info("%s received: stopping", signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            with self._lock:
                self._reloads += 1
        self._news.set()

    def wake(self) -> None:
        """Make `wait` return (a start-up step finished)."""
        self._news.set()

    def wait(self, timeout: float) -> None:
        """Return when a signal arrived or `wake` was called since the last call, or after `timeout`."""
        self._news.wait(timeout)
        self._news.clear()  # the state (stop, reloads) is read after this, so nothing is lost

    def run_until_stop(self, work: Callable[[], object], name: str) -> threading.Thread:
        """Run `work` on a thread called `name` and wait until it returns or a stop is asked,
        whichever comes first: a call that does not return (a runtime compiling a large
        model) never holds up a stop. What `work` raised is raised here. The thread, alive
        when it was left behind."""
        failure: list[BaseException] = []

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # raised again in the waiting thread
                failure.append(exc)
            finally:
                self.wake()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        while thread.is_alive() and not self.stop.is_set():
            self.wait(1.0)
        if failure:
            raise failure[0]
        return thread

    def exit_now(self, code: int, message: str) -> None:
        """`exit_now`, running the `before_exit` hooks first (under its backstop)."""
        exit_now(code, message, self.before_exit)

    def take_reload(self) -> bool:
        """True once for any number of SIGHUPs since the last call."""
        with self._lock:
            asked, self._reloads = self._reloads > 0, 0
        return asked


def exit_now(code: int, message: str, hooks: Iterable[Callable[[], object]] = ()) -> None:
    """Run `hooks` (one that raises is logged and the next runs), log `message`, flush the
    logs, and end the process with `code` without waiting for any thread. A backstop timer
    ends it even if a hook or a log handler is stuck."""
    backstop = threading.Timer(0.5, os._exit, (code,))
    backstop.daemon = True
    backstop.start()
    for hook in hooks:
        try:
            hook()
        except Exception as exc:  # exiting all the same
            log.error("before exiting: %s failed: %s: %s", getattr(hook, "__qualname__", hook),
                      type(exc).__name__, exc)
    log.warning("%s", message)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_steps(steps: Iterable[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run every step even when one raises; log each failure in one line with the step's
    name. Returns the names of the steps that failed."""
    failed = []
    for name, step in steps:
        try:
            if os.environ.get(TEST_FAIL_STOP_VARIABLE) == name:
                raise RuntimeError(f"{TEST_FAIL_STOP_VARIABLE}={name} (test-only switch)")
            step()
        except Exception as exc:  # the next step runs all the same
            log.error("stopping: %s failed, going on: %s: %s", name, type(exc).__name__, exc)
            log.debug("stopping: %s failed", name, exc_info=True)
            failed.append(name)
    return failed
