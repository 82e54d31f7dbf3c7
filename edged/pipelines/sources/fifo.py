"""A named pipe (FIFO) as a sensor source: `running` while a writer has it open.

A FIFO's reader sees its writer go away as the end of the input, and nothing at all
when the next one opens it. edged keeps the FIFO open for reading across writers and
asks poll(2) instead: Linux reports POLLHUP to a reader while no writer has the FIFO
open, once a writer has opened it since the reader did. Right after opening, edged
opens and closes it for writing once itself, so that holds from the start. So the
source is `reconnecting` ("no writer has the FIFO open") from the moment a writer closes, and `running`
again as soon as the next one opens, before it writes; the state is known even for a
producer that stays silent.
"""

from __future__ import annotations

import logging
import os
import select
import stat

from edged.config import SourceSettings
from edged.pipelines.sources.sensors import FOLLOW_POLL_S, WAIT_S, LineSource, same_file

log = logging.getLogger(__name__)
NO_WRITER = "no writer has the FIFO open"


class FifoSource(LineSource):
    """A named pipe read by whichever writer has it open; a FIFO made afresh at the same
    path is opened in its turn."""

    def __init__(self, settings: SourceSettings, name: str) -> None:
        super().__init__(settings, name)
        self.writers = 0  # writers seen, the first one included (`reconnects` counts the ones after)

    def details(self) -> dict:
        return {**super().details(), "writers": self.writers}

    def _run(self) -> None:
        path = str(self.settings.uri)
        while not self._stop.is_set():
            try:
                fd = _open_reader(path)
            except OSError as exc:
                if not self._lost(f"cannot open {path}: {exc.strerror}"):
                    break
                continue
            try:
                stopped = self._read_writers(fd, path)
            finally:
                os.close(fd)
            if stopped:
                break
            self._writer_gone()  # the path names another FIFO now, or none

    def _read_writers(self, fd: int, path: str) -> bool:
        """Read one writer after another until stopped (True) or `path` names another file."""
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        while not self._stop.is_set():
            events = poller.poll(WAIT_S * 1000)
            revents = events[0][1] if events else 0
            if revents & (select.POLLIN | select.POLLPRI):
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    self._writer_here()
                    self._consume(chunk)
                    continue
                revents |= select.POLLHUP  # read to the end: its writer has closed it
            if revents & (select.POLLHUP | select.POLLERR):
                self._writer_gone()
                # poll reports POLLHUP at once until a writer comes: look a few times a second.
                if self._stop.wait(FOLLOW_POLL_S):
                    break
            else:
                self._writer_here()  # quiet, no hang-up: a writer has it open
            if not same_file(path, fd):
                return False
        return True

    def _writer_here(self) -> None:
        if self.state == "running":
            return
        if self.writers:
            self.reconnects += 1
            log.info("%s: a writer opened it again, reading", self.label)
        self.writers += 1
        self._connected()

    def _writer_gone(self) -> None:
        if self.state == "reconnecting" and self.last_error == NO_WRITER:
            return
        if self.state == "running":
            self._end_of_input()  # its last line may have had no newline
            assert self.window is not None
            self.window.reset()  # a window must not span the gap between writers
        self.last_error = NO_WRITER
        self.state = "reconnecting"
        log.warning("%s: %s; waiting for one", self.label, self.last_error)


def _open_reader(path: str) -> int:
    """Open a FIFO for reading without waiting for a writer; then poll shows whether one has it."""
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        raise OSError(0, "not a FIFO")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: no wait for a writer, nor a stop
    try:
        # A writer of our own, gone at once, so a reader's POLLHUP means "no writer" from now on
        # (Linux sets it only once a writer has come and gone since the reader opened).
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except BaseException:
        os.close(fd)
        raise
    return fd
