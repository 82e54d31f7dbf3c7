"""Sensor pipelines on real inputs the tests create: a FIFO, a pty as the serial port, a file
that is appended to, truncated and rotated, a fake IIO tree in sysfs's layout, standard input
as a file and a pipe, and the daemon reading a FIFO. The model is a real OpenVINO IR that
sums each channel over a window of 4 samples x 2 channels."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import termios
import time
from pathlib import Path

from edged.config import SourceSettings
from edged.pipelines.sources.fifo import FifoSource
from edged.pipelines.sources.iio import Channel, find_channels
from edged.pipelines.sources.sensors import StdinSource
from tests.daemon_process import wait_until


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def top_classes(path: Path) -> list[tuple[str, float]]:
    return [(r["classes"][0]["label"], r["classes"][0]["score"]) for r in results(path)]


def open_writer(path: Path, timeout: float = 30.0) -> int:
    """Open a FIFO for writing once a reader has it open (a blocking open would wait forever)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline, exc
            time.sleep(0.02)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd


def test_a_fifo_feeds_windows_to_the_model_across_writers(run_pipeline, tmp_path):
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    with run_pipeline(SourceSettings(kind="fifo", uri=str(fifo), channels=2, window=4, stride=4)) as pipeline:
        writer = open_writer(fifo)
        os.write(writer, b"1,10\n2,20\nnot,a number\n3,30\n4,40\n")
        wait_until(lambda: pipeline.processed == 1, what=pipeline.status)
        os.close(writer)  # the writer goes away; the next one is read too
        writer = open_writer(fifo)
        os.write(writer, b"5,1\n6,1\r\n7,1\n8,1")  # the last line ends with the writer
        os.close(writer)
        wait_until(lambda: pipeline.processed == 2, what=pipeline.status)
        fifo.unlink()  # a producer that makes its FIFO afresh is found again
        os.mkfifo(fifo)
        writer = open_writer(fifo)
        os.write(writer, b"0,7\n0,7\n0,7\n0,7\n")
        os.close(writer)
        wait_until(lambda: pipeline.processed == 3, what=pipeline.status)
        wait_until(lambda: pipeline.status()["state"] == "reconnecting", what=pipeline.status)
        status = pipeline.status()
    assert top_classes(out) == [("high", 100.0), ("low", 26.0), ("high", 28.0)]
    assert [r["window"] for r in results(out)] == [1, 2, 3]
    assert status["last_error"] == "no writer has the FIFO open" and status["errors"] == 0
    assert status["frames"] == 3 and status["samples"] == 12
    assert status["malformed"] == 1
    assert status["last_malformed"] == "not a number: 'not,a number'"


def test_a_fifo_that_is_missing_or_not_a_fifo_is_waited_for(tmp_path):
    path = tmp_path / "later.fifo"
    source = FifoSource(SourceSettings(kind="fifo", uri=str(path), reopen_backoff_s=0.02), "p")
    source.start()
    try:
        wait_until(lambda: source.state == "reconnecting")
        assert source.last_error == f"cannot open {path}: No such file or directory"
        path.write_text("a regular file")
        wait_until(lambda: source.last_error == f"cannot open {path}: not a FIFO")
        path.unlink()
        os.mkfifo(path)
        wait_until(lambda: source.last_error == "no writer has the FIFO open")
        writer = open_writer(path)
        wait_until(lambda: source.state == "running")
        os.write(writer, b"1\n2\n")
        os.close(writer)
        wait_until(lambda: source.frames.received == 2)
    finally:
        source.stop()
    assert source.reconnects >= 2 and source.state == "stopped"


def test_a_pty_is_read_as_a_serial_port_and_replugged(run_pipeline, tmp_path):
    link = tmp_path / "ttyUSB0"  # like a udev name that follows the device
    master, slave = os.openpty()
    link.symlink_to(os.ttyname(slave))
    os.close(slave)
    out = tmp_path / "results.jsonl"
    source = SourceSettings(kind="serial", uri=str(link), baud=9600, format="jsonl", fields=["t", "h"],
                            window=4, stride=2, reopen_backoff_s=0.05)
    with run_pipeline(source) as pipeline:
        wait_until(lambda: pipeline.source.state == "running")
        probe = os.open(link, os.O_RDONLY | os.O_NOCTTY)
        iflag, _, _, lflag, ispeed, _, _ = termios.tcgetattr(probe)
        os.close(probe)
        assert ispeed == termios.B9600 and not lflag & (termios.ECHO | termios.ICANON)
        assert not iflag & termios.ICRNL
        os.write(master, b"".join(b'{"t": %d, "h": 1, "id": "s1"}\r\n' % n for n in range(1, 7)))
        wait_until(lambda: pipeline.source.frames.received == 2, what=pipeline.status)
        os.close(master)  # unplugged
        wait_until(lambda: pipeline.source.state == "reconnecting")
        assert pipeline.source.last_error
        link.unlink()
        master, slave = os.openpty()  # plugged back in, under the same name
        link.symlink_to(os.ttyname(slave))
        os.close(slave)
        wait_until(lambda: pipeline.source.state == "running")
        os.write(master, b'{"t": 0, "h": 9}\n' * 4)
        # Windows never span the unplugging: the next one holds only the new device's samples.
        wait_until(lambda: top_classes(out)[-1:] == [("high", 36.0)], what=lambda: results(out))
        status = pipeline.status()
        os.close(master)
    assert status["frames"] == 3 and status["reconnects"] >= 1 and status["malformed"] == 0
    assert top_classes(out)[0] in (("low", 10.0), ("low", 18.0))  # the first window may be dropped


def test_a_followed_file_survives_truncation_and_rotation(run_pipeline, tmp_path):
    log_file = tmp_path / "sensor.csv"
    log_file.write_text("9,9\n" * 100)  # already there: not read (from_start is off)
    out = tmp_path / "results.jsonl"

    def append(text: str, path: Path = log_file) -> None:
        with path.open("a") as f:
            f.write(text)

    source = SourceSettings(kind="file", uri=str(log_file), channels=2, window=4, stride=4,
                            reopen_backoff_s=0.05)
    with run_pipeline(source) as pipeline:
        wait_until(lambda: pipeline.source.state == "running")
        append("1,0\n1,0\n1,")
        wait_until(lambda: pipeline.source.window.samples == 2)
        append("0\n1,0\n")  # a line written in two parts is read as one
        wait_until(lambda: pipeline.processed == 1, what=pipeline.status)
        log_file.write_text("0,2\n0,2\n0,2\n0,2\n")  # truncated and written again, shorter
        wait_until(lambda: pipeline.processed == 2, what=pipeline.status)
        append("3,0\n3,0\n")
        log_file.rename(tmp_path / "sensor.csv.1")  # rotated: the old file is read to its end,
        append("3,0\n3,0\n")  # then the new one from its start
        wait_until(lambda: pipeline.processed == 3, what=pipeline.status)
        status = pipeline.status()
    assert top_classes(out) == [("low", 4.0), ("high", 8.0), ("low", 12.0)]
    assert status["malformed"] == 0 and status["errors"] == 0


def test_a_followed_file_that_appears_later_is_read_from_its_start(run_pipeline, tmp_path):
    log_file = tmp_path / "later.csv"
    source = SourceSettings(kind="file", uri=str(log_file), channels=2, window=4, stride=4,
                            reopen_backoff_s=0.05)
    with run_pipeline(source) as pipeline:
        wait_until(lambda: pipeline.source.state == "reconnecting")
        assert pipeline.status()["last_error"] == f"cannot open {log_file}: No such file or directory"
        log_file.write_text("5,0\n" * 4)
        wait_until(lambda: pipeline.processed == 1, what=pipeline.status)
    assert top_classes(tmp_path / "results.jsonl") == [("low", 20.0)]


def test_from_start_reads_what_the_file_holds(run_pipeline, tmp_path):
    log_file = tmp_path / "held.jsonl"
    log_file.write_text('{"a": 1, "b": 2}\n' * 4)
    source = SourceSettings(kind="file", uri=str(log_file), format="jsonl", fields=["a", "b"],
                            window=4, from_start=True)
    with run_pipeline(source, model="winraw") as pipeline:
        wait_until(lambda: pipeline.processed == 1, what=pipeline.status)
    record = results(tmp_path / "results.jsonl")[0]
    assert record["outputs"] == {"sums": {"shape": [1, 2], "dtype": "float32", "data": [4.0, 8.0]}}


def make_iio_device(base: Path, number: int = 0, temp_raw: int = 2000) -> Path:
    """A device directory as the kernel shows it, made aside and moved in whole like a hotplug."""
    staging = base.parent / "staging" / f"iio:device{number}"
    staging.mkdir(parents=True)
    (staging / "name").write_text("fakesensor\n")
    (staging / "in_temp_raw").write_text(f"{temp_raw}\n")
    (staging / "in_temp_offset").write_text("-500\n")
    (staging / "in_temp_scale").write_text("0.01\n")  # (2000 - 500) * 0.01 = 15 degrees
    (staging / "in_humidityrelative_input").write_text("40.5\n")  # already in units
    (staging / "sampling_frequency").write_text("10\n")
    base.mkdir(parents=True, exist_ok=True)
    return staging.rename(base / staging.name)


def test_iio_channels_are_read_scaled_and_the_device_can_come_and_go(run_pipeline, tmp_path):
    base = tmp_path / "sys" / "bus" / "iio" / "devices"
    make_iio_device(base, 3)
    source = SourceSettings(kind="iio", uri="fakesensor", iio_base_dir=base, sample_rate_hz=100,
                            window=4, stride=4, reopen_backoff_s=0.05)
    with run_pipeline(source, model="winraw") as pipeline:
        wait_until(lambda: pipeline.processed >= 1, what=pipeline.status)
        status = pipeline.status()
        assert status["state"] == "running" and status["channels"] == ["in_humidityrelative", "in_temp"]
        shutil.rmtree(base / "iio:device3")  # the device goes away
        wait_until(lambda: "no IIO device 'fakesensor'" in pipeline.source.last_error, what=pipeline.status)
        assert pipeline.source.state == "reconnecting"
        make_iio_device(base, 4, temp_raw=1500)  # and comes back under another number
        wait_until(lambda: pipeline.source.state == "running", what=pipeline.status)
        processed = pipeline.processed
        wait_until(lambda: pipeline.processed > processed + 1, what=pipeline.status)
        status = pipeline.status()
    sums = [r["outputs"]["sums"]["data"] for r in results(tmp_path / "results.jsonl")]
    assert sums[0] == [162.0, 60.0] and sums[-1] == [162.0, 40.0], (sums, status)
    assert status["reconnects"] >= 1 and status["errors"] == 0, status


def test_iio_channel_files_scale_and_offset(tmp_path):
    device = tmp_path / "iio:device0"
    device.mkdir()
    for name, value in {"in_accel_x_raw": "1", "in_accel_y_raw": "2", "in_accel_scale": "0.5",
                        "in_voltage0_raw": "10", "in_voltage0_scale": "2", "in_voltage_scale": "99",
                        "in_temp_raw": "1", "in_temp_input": "21500", "out_voltage0_raw": "0"}.items():
        (device / name).write_text(value)
    channels = find_channels(device, [])
    assert [(c.name, c.path.name, c.offset, c.scale) for c in channels] == [
        ("in_accel_x", "in_accel_x_raw", 0.0, 0.5),  # the scale its type shares
        ("in_accel_y", "in_accel_y_raw", 0.0, 0.5),
        ("in_temp", "in_temp_input", 0.0, 1.0),  # _input is already in units
        ("in_voltage0", "in_voltage0_raw", 0.0, 2.0),  # its own scale wins
    ]
    assert find_channels(device, ["in_voltage0"]) == [Channel("in_voltage0", device / "in_voltage0_raw",
                                                              0.0, 2.0)]


def test_a_stuck_sensor_degrades_the_pipeline_until_it_moves(run_pipeline, tmp_path):
    base = tmp_path / "devices"
    device = make_iio_device(base)
    source = SourceSettings(kind="iio", uri="iio:device0", iio_base_dir=base, sample_rate_hz=100,
                            iio_channels=["in_temp", "in_humidityrelative"], window=4, stride=2)
    with run_pipeline(source, model="winraw", quality={"stuck_after_s": 0.3}) as pipeline:
        wait_until(lambda: pipeline.status()["state"] == "degraded", what=pipeline.status)
        assert pipeline.status()["degraded_reason"].startswith("sensor stuck on 15.0, 40.5 for ")
        (device / "in_temp_raw").write_text("2100\n")
        wait_until(lambda: pipeline.status()["state"] == "running", what=pipeline.status)
        status = pipeline.status()
    assert status["degraded_reason"] == "" and status["processed"] > 0 and status["errors"] == 0


def test_a_window_that_does_not_fit_the_model_is_a_counted_error(run_pipeline, tmp_path):
    data = tmp_path / "three.csv"
    data.write_text("1,2,3\n" * 8)
    source = SourceSettings(kind="file", uri=str(data), columns=[0, 1, 2], window=2, from_start=True)
    with run_pipeline(source) as pipeline:
        wait_until(lambda: pipeline.errors >= 1, what=pipeline.status)
    assert pipeline.last_error == ("a window of 2 samples x 3 channels does not fit model input [1, 4, 2]; "
                                   "set source.window and source.channels to match")
    assert pipeline.processed == 0


def test_a_model_whose_decoder_reads_images_is_refused_for_a_sensor(run_pipeline, window_store,
                                                                     window_manager, window_ir, tmp_path):
    files = [window_ir, window_ir.with_suffix(".bin")]
    window_store.add("winface", files, "1", decoder={"type": "blazeface"})
    window_store.activate("winface", "1")
    window_manager.sync()
    data = tmp_path / "data.csv"
    data.write_text("1,2\n" * 4)
    source = SourceSettings(kind="file", uri=str(data), channels=2, window=4, from_start=True)
    with run_pipeline(source, model="winface") as pipeline:
        wait_until(lambda: pipeline.errors >= 1, what=pipeline.status)
    assert pipeline.last_error.startswith("decoder.type 'blazeface' reads images; a sensor pipeline takes")


def test_stdin_from_a_file_loses_no_window_and_finishes(tmp_path):
    data = tmp_path / "samples.csv"
    data.write_text("".join(f"{n},{-n}\n" for n in range(1, 41)) + "41,-41")  # no newline at the end
    fd = os.open(data, os.O_RDONLY)
    source = StdinSource(SourceSettings(kind="stdin", channels=2, window=4, stride=1), "p", fd=fd)
    source.start()
    try:
        windows = []
        while len(windows) < 38:
            window = source.take(timeout=30)  # taken slowly: a file waits, nothing is dropped
            assert window is not None, source.state
            windows.append(window)
        wait_until(lambda: source.state == "finished")
    finally:
        source.stop()
        os.close(fd)
    assert [int(w.data[-1, 0]) for w in windows] == list(range(4, 42))
    assert windows[-1].data[:, 1].tolist() == [-38, -39, -40, -41]
    assert source.frames.dropped == 0 and windows[-1].samples == 41


def test_stdin_from_a_pipe(tmp_path):
    read_end, write_end = os.pipe()
    source = StdinSource(SourceSettings(kind="stdin", format="jsonl", window=2, stride=2), "p", fd=read_end)
    source.start()
    try:
        os.write(write_end, b"[1]\n[2]\n{}\n[3]\n[4]\n")
        wait_until(lambda: source.frames.received == 2)
        assert source.state == "running"
        os.close(write_end)
        wait_until(lambda: source.state == "finished")
        window = source.take(timeout=1)
    finally:
        source.stop()
        os.close(read_end)
    assert window.data[:, 0].tolist() == [3, 4] and window.number == 2
    assert source.details()["malformed"] == 1


def test_the_daemon_runs_a_fifo_pipeline_into_jsonl(start_daemon, window_store, tmp_path):
    fifo = tmp_path / "daemon.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out" / "sensor.jsonl"
    daemon = start_daemon(window_store.root, config={"pipelines": {"vibration": {
        "model": "win",
        "source": {"kind": "fifo", "uri": str(fifo), "format": "jsonl", "fields": ["x", "y"],
                   "window": 4, "stride": 2},
        "sinks": [{"path": str(out)}],
    }}})
    writer = open_writer(fifo)
    lines = [json.dumps({"x": n, "y": 10 - n}) + "\n" for n in range(6)]
    os.write(writer, "".join([*lines[:3], "{broken\n", lines[3]]).encode())
    with daemon.client() as client:
        def processed() -> int:
            return client.pipelines()["vibration"]["processed"]

        wait_until(lambda: processed() == 1, timeout=30, what=daemon.output)
        os.write(writer, "".join(lines[4:]).encode())
        wait_until(lambda: processed() == 2, timeout=30, what=daemon.output)
        status = client.pipelines()["vibration"]
    os.close(writer)
    assert status["state"] == "running" and status["source"] == str(fifo)
    assert status["samples"] == 6 and status["malformed"] == 1 and status["errors"] == 0
    assert "skipped a malformed sample, not JSON" in daemon.output()
    records = results(out)
    assert [r["window"] for r in records] == [1, 2]
    assert [r["classes"][0] for r in records] == [{"index": 1, "label": "high", "score": 34.0},
                                                 {"index": 1, "label": "high", "score": 26.0}]
    assert all(r["pipeline"] == "vibration" and r["model"] == "win" for r in records)
