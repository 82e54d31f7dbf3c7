"""Sensor samples as text lines from a serial port, a followed file or stdin (a FIFO: `fifo.py`).

Each source turns its bytes into lines, each line into a sample (`LineParser`),
and samples into windows (`SampleWindow`) that go to the newest-item mailbox
like camera frames. A device that goes away is reopened with a doubling backoff,
like a camera; a malformed line is counted and skipped, never fatal.
"""

from __future__ import annotations

import abc
import logging
import os
import select
import stat
import termios

import numpy as np

from edged.config import SourceSettings
from edged.pipelines.sources import LatestFrame, ThreadedSource, Window
from edged.pipelines.sources.lines import LineParser, Rejects, SampleWindow

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
MAX_LINE = 64 << 10  # bytes; a longer "line" is malformed
FOLLOW_POLL_S = 0.1  # how often a followed file is looked at when it has nothing new
WAIT_S = 0.5  # longest wait before the stop flag is looked at


class SampleSource(ThreadedSource):
    """Samples in, windows out; what every sensor source shares."""

    def __init__(self, settings: SourceSettings, name: str) -> None:
        label = settings.uri or settings.kind
        super().__init__(label)
        self.settings = settings
        self.label = f"pipeline {name} source {label}" if name else f"source {label}"
        self.frames = LatestFrame(Window)
        self.rejects = Rejects(self.label)
        channels = settings.sample_channels
        self.window = SampleWindow(settings.window, settings.stride, channels) if channels else None
        self.lossless = False  # wait for each window to be taken (finite input) instead of dropping
        self._backoff = settings.reopen_backoff_s

    def push(self, sample: np.ndarray) -> None:
        assert self.window is not None
        data = self.window.push(sample)
        if data is None:
            return
        while self.lossless and not self._stop.is_set() and not self.frames.wait_taken(WAIT_S):
            pass
        self.frames.put(data, samples=self.window.samples)

    def details(self) -> dict:
        return {"samples": self.window.samples if self.window else 0,
                "malformed": self.rejects.count, "last_malformed": self.rejects.last}

    def _grab(self) -> None:
        while not self._stop.is_set():
            try:
                self._run()
                break
            except Exception as exc:  # a bug must not end the source for good
                log.exception("%s failed", self.label)
                if not self._lost(f"reading failed: {type(exc).__name__}: {exc}"):
                    break
        if self.state != "finished":
            self.state = "stopped"

    @abc.abstractmethod
    def _run(self) -> None:
        """Read samples and `push` them until stopped (or the input is finished)."""

    def _connected(self) -> None:
        self.last_error = ""  # before the state, so a reader never sees "running" with an old error
        self.state = "running"
        self._backoff = self.settings.reopen_backoff_s

    def _lost(self, reason: str) -> bool:
        """Report the loss, wait the backoff; False when asked to stop meanwhile."""
        if self.last_error != reason or self.state != "reconnecting":
            log.warning("%s: %s; reopening", self.label, reason)
        self.last_error = reason
        self.state = "reconnecting"
        if self._stop.wait(self._backoff):
            return False
        self._backoff = min(self._backoff * 2, max(MAX_BACKOFF_S, self.settings.reopen_backoff_s))
        self.reconnects += 1
        return True


class LineSource(SampleSource):
    """Bytes -> lines -> samples; subclasses open the input and call `_read_fd` or `_consume`."""

    def __init__(self, settings: SourceSettings, name: str) -> None:
        super().__init__(settings, name)
        self.parser = LineParser(settings.format, settings.sample_channels, settings.fields,
                                 settings.columns, self.label)
        self.rejects = self.parser.rejects
        self._partial = b""

    def _consume(self, chunk: bytes) -> None:
        lines = (self._partial + chunk.replace(b"\r", b"\n")).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self.rejects.note(f"longer than {MAX_LINE} bytes", self._partial.decode(errors="replace"))
            self._partial = b""
        for line in lines:
            sample = self.parser.parse(line)
            if sample is not None:
                self.push(sample)

    def _end_of_input(self) -> None:
        """The writer is done: what is left is a last line without its newline."""
        self._consume(b"\n")

    def _read_fd(self, fd: int) -> str:
        """Read until the input ends ("eof"), fails ("lost") or we stop ("stopped")."""
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        while not self._stop.is_set():
            if not poller.poll(WAIT_S * 1000):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the serial device or pty is gone
                return "lost"
            if not chunk:
                return "eof"
            self._consume(chunk)
        return "stopped"


class SerialSource(LineSource):
    """A tty in raw mode at `baud`, 8N1; unplugged -> reconnecting until it is back."""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = self._open()
            except (OSError, termios.error) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not a serial device"
                if not self._lost(f"cannot open {self.settings.uri}: {reason}"):
                    break
                continue
            self._connected()
            try:
                outcome = self._read_fd(fd)
            finally:
                os.close(fd)
            if outcome == "stopped":
                break
            self._partial = b""
            assert self.window is not None
            self.window.reset()  # a window must not span the gap
            if not self._lost(f"{self.settings.uri} went away"):
                break

    def _open(self) -> int:
        fd = os.open(str(self.settings.uri), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(fd)
            iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                       | termios.IGNCR | termios.ICRNL | termios.IXON | termios.IXOFF | termios.IXANY)
            oflag &= ~termios.OPOST
            lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
            cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)
            cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
            speed = getattr(termios, f"B{self.settings.baud}")
            termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])
            termios.tcflush(fd, termios.TCIFLUSH)  # bytes from before we looked are stale
        except BaseException:
            os.close(fd)
            raise
        return fd


class FollowedFileSource(LineSource):
    """A file followed like `tail -F`: appended lines are read; truncation and rotation survived."""

    def _run(self) -> None:
        path = str(self.settings.uri)
        skip_existing = not self.settings.from_start
        while not self._stop.is_set():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                skip_existing = False  # a file that appears later is all new
                if not self._lost(f"cannot open {path}: {exc.strerror}"):
                    break
                continue
            if skip_existing:
                os.lseek(fd, 0, os.SEEK_END)
                skip_existing = False
            self._connected()
            try:
                self._follow(fd, path)
            except OSError as exc:  # e.g. EIO from a network file system
                if not self._lost(f"cannot read {path}: {exc.strerror}"):
                    break
            finally:
                os.close(fd)

    def _follow(self, fd: int, path: str) -> None:
        """Read what is appended until the path names another file (rotated) or none, or we stop."""
        while not self._stop.is_set():
            chunk = os.read(fd, 65536)
            if chunk:
                self._consume(chunk)
                continue
            if not same_file(path, fd):
                self._end_of_input()  # rotated away and read to its end: on to the new file
                return
            if os.stat(path).st_size < os.lseek(fd, 0, os.SEEK_CUR):
                log.info("%s: truncated; reading it from the start", self.label)
                os.lseek(fd, 0, os.SEEK_SET)
                self._partial = b""
                continue
            self._stop.wait(FOLLOW_POLL_S)


class StdinSource(LineSource):
    """Standard input (or any open descriptor) until it ends; then the source is finished.

    When it is a regular file (`edged run < samples.csv`), every window goes through:
    a file can wait for the model, as a video file does.
    """

    def __init__(self, settings: SourceSettings, name: str, fd: int = 0) -> None:
        super().__init__(settings, name)
        self.fd = fd

    def _run(self) -> None:
        try:
            self.lossless = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except OSError as exc:
            self.last_error = f"standard input: {exc.strerror}"
            return
        self.state = "running"
        if self._read_fd(self.fd) != "stopped":
            self._end_of_input()
            self.state = "finished"


def same_file(path: str, fd: int) -> bool:
    """Does `path` still name the file open as `fd`?"""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (named.st_ino, named.st_dev) == (opened.st_ino, opened.st_dev)
