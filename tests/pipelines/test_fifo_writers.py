"""Issue 10, case 6: a FIFO sensor whose writer closes. A real FIFO (os.mkfifo) and real
writers that open it, write, and close it; the pipeline must say `reconnecting` while no
writer has it open, and `running` again as soon as one opens it (before it writes)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from edged.config import SourceSettings
from tests.daemon_process import wait_until
from tests.pipelines.test_sensor_sources import open_writer, results

NO_WRITER = "no writer has the FIFO open"


def test_a_fifo_whose_writer_closes_is_reconnecting_until_a_writer_returns(run_pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edged.pipelines.sources.fifo")
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    seen: list[tuple[str, str]] = []
    source = SourceSettings(kind="fifo", uri=str(fifo), channels=2, window=4, stride=4)
    with run_pipeline(source) as pipeline:

        def reach(state: str) -> None:
            wait_until(lambda: pipeline.status()["state"] == state, what=pipeline.status)
            status = pipeline.status()
            seen.append((status["state"], status["last_error"]))

        reach("reconnecting")  # nobody has opened it yet
        for writer_number in range(1, 4):
            writer = open_writer(fifo)
            reach("running")  # the writer is there; it has not written yet
            os.write(writer, b"1,1\n2,2\n3,3\n4,4\n")
            wait_until(lambda n=writer_number: pipeline.processed == n, what=pipeline.status)
            os.close(writer)  # the fault: the writer goes away
            reach("reconnecting")
        status = pipeline.status()
    assert seen == [("reconnecting", NO_WRITER)] + [("running", ""), ("reconnecting", NO_WRITER)] * 3
    assert status["writers"] == 3 and status["reconnects"] == 2 and status["errors"] == 0
    assert [r["window"] for r in results(tmp_path / "results.jsonl")] == [1, 2, 3]
    # One line per change: a warning each time it is left without a writer, a note each return.
    logged = [(r.levelname, r.getMessage().split(": ", 1)[1]) for r in caplog.records
              if r.name == "edged.pipelines.sources.fifo"]
    gone, back = ("WARNING", f"{NO_WRITER}; waiting for one"), ("INFO", "a writer opened it again, reading")
    assert logged == [gone, gone, back, gone, back, gone]  # at start, then after each of 3 writers


def test_the_daemon_shows_a_fifo_without_a_writer_as_reconnecting(start_daemon, window_store, tmp_path):
    fifo = tmp_path / "daemon.fifo"
    os.mkfifo(fifo)
    daemon = start_daemon(window_store.root, config={"pipelines": {"vibration": {
        "model": "win", "source": {"kind": "fifo", "uri": str(fifo), "channels": 2, "window": 4, "stride": 4},
    }}})
    with daemon.client() as client:
        def state() -> tuple[str, str]:
            status = client.pipelines()["vibration"]
            return status["state"], status["last_error"]

        wait_until(lambda: state() == ("reconnecting", NO_WRITER), what=daemon.output)
        # Side fix (b): nothing inferred yet, so no latency: `-`, not "None".
        shown = subprocess.run([sys.executable, "-m", "edged", "pipelines", "status", "--socket",
                                str(daemon.socket)], capture_output=True, text=True, check=True).stdout
        writer = open_writer(fifo)
        wait_until(lambda: state() == ("running", ""), what=daemon.output)
        os.write(writer, b"1,1\n2,2\n3,3\n4,4\n")
        wait_until(lambda: client.pipelines()["vibration"]["processed"] == 1, what=daemon.output)
        os.close(writer)
        wait_until(lambda: state() == ("reconnecting", NO_WRITER), what=daemon.output)
        writer = open_writer(fifo)
        wait_until(lambda: state() == ("running", ""), what=daemon.output)
        os.close(writer)
        wait_until(lambda: state() == ("reconnecting", NO_WRITER), what=daemon.output)
    assert daemon.output().count(f"{NO_WRITER}; waiting for one") == 3  # at start and after each writer
    assert "infer p50 - ms" in shown and "None" not in shown and NO_WRITER in shown
