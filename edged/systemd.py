"""Talking to systemd: notifications, the watchdog, socket activation, the journal.

Everything here is a no-op, or falls back to what edged does on its own, when
the daemon does not run under systemd: no `NOTIFY_SOCKET`, no `WATCHDOG_USEC`,
no `LISTEN_FDS`, stderr not connected to the journal.

The watchdog proves that inference works, not that a thread is alive. The
daemon's main loop calls `Watchdog.tick()` every quarter of the ping interval
(half of `WatchdogSec=`) or more often. When a ping interval has passed, `tick`
starts a check on a thread of its own (one at a time): the daemon's check runs
one small inference (zeros shaped like each input) per served model through
`ModelManager.infer`, the same path, pool of infer requests and backend as a
request from the socket or a pipeline. A later `tick` sends `WATCHDOG=1` only
when that check has finished, within half a ping interval. So when inference
hangs (a runtime deadlocked, every worker of a model held by requests that do
not finish), the check does not finish, no new one is started, the pings stop
and systemd restarts the daemon after `WatchdogSec=`; when it comes unstuck in
time, the check finishes and the pings resume. When the main loop itself is
stuck, nothing pings either. Pings are at most 1.75 ping intervals apart while
healthy (a check started up to one tick late, taking up to half an interval,
pinged up to one tick later), inside `WatchdogSec=` = 2 intervals.

A check counts as finished when every model answered, with outputs or with an
error: the watchdog catches hangs; a model that fails is handled by the runtime
fallback and shown in the status, and restarting the daemon would not mend it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edged.config import ConfigError
from edged.errors import EdgedError
from systemd import daemon, journal  # systemd-python; ruff files it here for the repo's systemd/

if TYPE_CHECKING:
    from edged.models.manager import ModelManager

log = logging.getLogger(__name__)
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STRUCTURED_FIELDS = ("MODEL", "VERSION", "PIPELINE")  # from a log call's `extra`
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")  # where libsystemd sends entries


# --- sd_notify ---------------------------------------------------------------------
NOTIFY_TIMEOUT_S = 1.0  # a full notify queue (PID 1 busy) costs the main loop this much at most
_notify_address: list[str | None] = []  # NOTIFY_SOCKET, read (and unset) once
_notify_error = [""]  # the last error notifying, logged once


def notify(*lines: str) -> bool:
    """Send `lines` as one message; False, and nothing sent, without a NOTIFY_SOCKET.

    Sent with Python's own socket rather than `systemd.daemon.notify`: that one blocks in
    sendmsg holding the GIL when the receiving queue is full, which freezes every thread
    of the daemon, inference too. Here a send waits at most NOTIFY_TIMEOUT_S, without the
    GIL, then the message is dropped. The kernel adds our credentials (systemd's socket
    has SO_PASSCRED), which is all a Type=notify service's main process needs.
    """
    if not _notify_address:  # children we might start must not speak for us: unset it
        value = os.environ.pop("NOTIFY_SOCKET", "")
        _notify_address.append("\0" + value[1:] if value.startswith("@") else value or None)
    address = _notify_address[0]
    if address is None:
        return False
    try:
        if not address.startswith(("/", "\0")):
            raise OSError(f"unsupported address {address!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT_S)
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:  # systemd gone or too busy to read: serve on regardless
        if str(exc) != _notify_error[0]:
            log.warning("cannot notify systemd at %s: %s", address.replace("\0", "@"), exc or "timed out")
        _notify_error[0] = str(exc)
        return False
    _notify_error[0] = ""
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping(status: str = "stopping") -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC is what Type=notify-reload (systemd 253) asks for; older ones ignore it.
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", "STATUS=reloading the configuration")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec=), or None when systemd watches nothing."""
    value, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not value or (pid and pid != str(os.getpid())):
        return None
    try:
        usec = int(value)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", value)
        return None
    return usec / 2e6 if usec > 0 else None


# --- socket activation -------------------------------------------------------------
def listen_socket() -> socket.socket | None:
    """The listening API socket systemd passed us, or None when we bind it ourselves.

    `listen_fds_with_names` checks LISTEN_PID and unsets LISTEN_FDS, LISTEN_PID
    and LISTEN_FDNAMES, so a child never takes the socket for its own.
    """
    if "LISTEN_FDS" not in os.environ:
        return None
    fds = daemon.listen_fds_with_names()
    if not fds:  # LISTEN_PID names another process: those descriptors are not ours
        return None
    if len(fds) != 1:
        names = ", ".join(f"fd {fd} ({name or 'unnamed'})" for fd, name in sorted(fds.items()))
        raise ConfigError(f"socket activation: edged takes one socket, systemd passed {len(fds)}: {names}")
    fd, name = next(iter(fds.items()))
    if not daemon.is_socket_unix(fd, socket.SOCK_STREAM, 1):
        raise ConfigError(
            f"socket activation: fd {fd} ({name or 'unnamed'}) is not a listening AF_UNIX stream socket; "
            "edged.socket needs ListenStream=/path/to/edged.sock"
        )
    listener = socket.socket(fileno=fd)
    listener.set_inheritable(False)
    return listener


# --- the journal -------------------------------------------------------------------
def stderr_is_journal() -> bool:
    """True when stderr is the journal's stream socket (systemd sets JOURNAL_STREAM=dev:inode)."""
    dev, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(dev), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError, AttributeError):  # unset or malformed, or no real stderr
        return False


class JournalHandler(logging.Handler):
    """Log records as journal entries with fields: the standard ones, and MODEL, VERSION, PIPELINE.

    Not systemd-python's own handler: that one sends every attribute of a record
    (MSG, ARGS, LEVELNAME, ...) as a field of its own.
    """

    def __init__(self, identifier: str = "edged") -> None:
        super().__init__()
        self.identifier = identifier
        self.setFormatter(logging.Formatter("%(message)s"))  # the journal keeps time and priority

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(journal.JournalHandler.map_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for key in STRUCTURED_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
        except Exception:
            self.handleError(record)
            return
        try:
            journal.send(**fields)
        except OSError:  # journald overwhelmed or restarting: the line still goes to stderr
            sys.stderr.write(fields["MESSAGE"] + "\n")


def journald_handler(identifier: str = "edged") -> logging.Handler:
    """Structured journal entries when stderr is the journal, plain text lines on stderr otherwise."""
    # Without journald's socket, libsystemd drops entries without a word: keep to stderr then.
    if stderr_is_journal() and JOURNAL_SOCKET.exists():
        return JournalHandler(identifier)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


def configure_logging(level: str, identifier: str = "edged") -> None:
    """The root logger of `edged` and `edged-registry` alike, so that under systemd both
    write journal entries (the journal adds the time) rather than lines with a time of their own."""
    logging.basicConfig(level=level.upper(), handlers=[journald_handler(identifier)])


# --- the watchdog ------------------------------------------------------------------
class Watchdog:
    """Pings systemd from the main loop while `check` (run on a thread of its own) keeps finishing."""

    def __init__(self, check: Callable[[], None], interval: float | None) -> None:
        self.check = check
        self.interval = interval  # seconds between pings; None: systemd watches nothing
        self.deadline = interval / 2 if interval else 0.0  # a check must finish within this
        self.pings = 0
        self.late = 0  # checks that finished, but too late to count
        self._thread: threading.Thread | None = None
        self._started = 0.0  # when the current (or last) check started
        self._took: float | None = None  # set by the check's thread when it finishes in order
        self._last_ping: float | None = None

    @property
    def tick_s(self) -> float:
        """How often the main loop should call `tick` (at most a second: it also updates STATUS=)."""
        return min(self.interval / 4, 1.0) if self.interval else 1.0

    def tick(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if self._thread is not None:
            if self._thread.is_alive():
                return  # still running: no ping, and no second check piling up behind it
            self._thread = None
            if self._took is not None and self._took <= self.deadline:
                watchdog()
                self.pings += 1
                self._last_ping = now
            else:
                self.late += 1
                log.warning("watchdog: the inference check %s; no ping this time",
                            "failed" if self._took is None else
                            f"took {self._took:.2f} s (limit {self.deadline:.2f} s)")
        if now - self._started >= self.interval:
            self._started, self._took = now, None
            self._thread = threading.Thread(target=self._run, name="watchdog-check", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.check()
        except Exception:
            log.exception("watchdog: the inference check failed")
            return
        self._took = time.monotonic() - started

    def stuck_for(self) -> float:
        """Seconds the running check has been running, once past its deadline (else 0)."""
        if self._thread is None or not self._thread.is_alive():
            return 0.0
        running = time.monotonic() - self._started
        return running if running > self.deadline else 0.0

    def status(self) -> dict[str, Any]:
        if self.interval is None:
            return {"enabled": False}
        running, now = self._thread is not None and self._thread.is_alive(), time.monotonic()
        return {
            "enabled": True, "ping_interval_s": round(self.interval, 3),
            "check_deadline_s": round(self.deadline, 3), "pings": self.pings, "late_checks": self.late,
            "last_ping_s_ago": None if self._last_ping is None else round(now - self._last_ping, 3),
            "check_running_s": round(now - self._started, 3) if running else 0.0,
        }


def inference_check(manager: ModelManager) -> Callable[[], None]:
    """The watchdog's check: one inference of zeros per served model, through the manager."""
    errors: dict[str, str] = {}  # model -> its last error, logged once

    def check() -> None:
        for name, served in manager.served().items():
            inputs = {spec.name: np.zeros([d if d > 0 else 1 for d in spec.shape], spec.dtype)
                      for spec in served.loaded.inputs}
            try:
                manager.infer(name, inputs, internal=True)  # not a client request: counted apart
            except EdgedError as exc:  # it answered: a failing model is not a hung daemon
                if errors.get(name) != str(exc):
                    log.warning("watchdog: %s answered the inference check with an error: %s", name, exc,
                                extra={"MODEL": name, "VERSION": served.version})
                errors[name] = str(exc)
            else:
                errors.pop(name, None)

    return check
