"""Sensor lines -> samples -> windows -> model inputs, the stuck-sensor check, and the
configuration rules for sensor sources."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edged.config import ConfigError, QualitySettings, SourceSettings, load_settings
from edged.errors import InvalidInput
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import window_to_tensor
from edged.pipelines.quality import SensorQualityMonitor
from edged.pipelines.sources.lines import LineParser, SampleWindow


def samples(parser: LineParser, lines: list) -> list[list[float]]:
    return [s.tolist() for s in map(parser.parse, lines) if s is not None]


def test_csv_lines_become_samples_and_columns_pick_and_order():
    every = LineParser("csv", 3)
    assert samples(every, [b"1,2.5,-3\n", "4, 5 ,6", b"7,8,9\r"]) == [[1, 2.5, -3], [4, 5, 6], [7, 8, 9]]
    picked = LineParser("csv", 2, columns=[2, 0])
    assert samples(picked, ["17,21.5,40", "18,21.5,41"]) == [[40, 17], [41, 18]]
    assert picked.parse("1,2,3").dtype == np.float32
    assert every.malformed == picked.malformed == 0


def test_json_lines_are_lists_or_objects_read_by_field():
    lists = LineParser("jsonl", 2)
    assert samples(lists, [b"[1, 2]", "[3.5, -4e2]"]) == [[1, 2], [3.5, -400]]
    objects = LineParser("jsonl", 2, fields=["temp", "hum"])
    lines = ['{"hum": 40, "temp": 21.5, "id": "x"}', '{"temp": 1, "hum": 2}']
    assert samples(objects, lines) == [[21.5, 40], [1, 2]]
    assert objects.malformed == 0


def test_blank_lines_are_skipped_and_not_counted():
    parser = LineParser("csv", 1)
    assert samples(parser, [b"", b"   ", b"\r", "1"]) == [[1]]
    assert parser.malformed == 0


@pytest.mark.parametrize(("fmt", "line", "reason"), [
    ("csv", "1,2,3", "3 values, expected 2"),
    ("csv", "1,abc", "not a number"),
    ("csv", "1,nan", "not a finite float32"),
    ("csv", "1,inf", "not a finite float32"),
    ("csv", "1,1e39", "not a finite float32"),
    ("csv", b"1,\xff2", "not UTF-8"),
    ("jsonl", "[1, 2", "not JSON"),
    ("jsonl", "[1, NaN]", "not a finite float32"),
    ("jsonl", "[1, true]", "a value is not a number"),
    ("jsonl", '[1, "2"]', "a value is not a number"),
    ("jsonl", "[1, [2]]", "a value is not a number"),
    ("jsonl", "3", "not a JSON list or object"),
    ("jsonl", '{"a": 1, "b": 2}', "source.fields names none"),
    ("jsonl", "[1, 1" + "0" * 400 + "]", "too large"),
])
def test_a_malformed_line_is_counted_and_skipped(fmt, line, reason):
    parser = LineParser(fmt, 2)
    assert parser.parse(line) is None
    assert parser.parse("[5, 6]" if fmt == "jsonl" else "5,6").tolist() == [5, 6]  # and goes on
    assert parser.malformed == 1
    assert reason in parser.rejects.last


def test_json_objects_missing_a_field_and_csv_short_of_a_column():
    objects = LineParser("jsonl", 2, fields=["temp", "hum"])
    assert objects.parse('{"temp": 1}') is None
    assert objects.rejects.last.startswith("no field 'hum'")
    columns = LineParser("csv", 1, columns=[3])
    assert columns.parse("1,2") is None
    assert columns.rejects.last.startswith("2 columns, column 3 wanted")


def test_a_flood_of_malformed_lines_logs_one_line(caplog):
    parser = LineParser("csv", 1, label="pipeline p source /dev/ttyUSB0")
    with caplog.at_level(logging.WARNING, logger="edged.pipelines.sources.lines"):
        for _ in range(1000):
            parser.parse("garbage")
    assert parser.malformed == 1000
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message == "pipeline p source /dev/ttyUSB0: skipped a malformed sample, not a number: 'garbage'"
    assert "\n" not in message


def test_a_window_comes_when_first_full_then_every_stride_samples():
    window = SampleWindow(size=4, stride=2, channels=2)
    out = [window.push(np.array([n, -n], np.float32)) for n in range(1, 11)]
    emitted = [n + 1 for n, w in enumerate(out) if w is not None]
    assert emitted == [4, 6, 8, 10]
    assert out[3].tolist() == [[1, -1], [2, -2], [3, -3], [4, -4]]
    assert out[5][:, 0].tolist() == [3, 4, 5, 6]
    assert out[9][:, 0].tolist() == [7, 8, 9, 10]
    assert out[9].dtype == np.float32 and out[9].flags.c_contiguous
    out[9][:] = 0  # a window is a copy: later windows are not touched
    assert window.push(np.array([11, -11], np.float32)) is None
    assert window.push(np.array([12, -12], np.float32))[:, 0].tolist() == [9, 10, 11, 12]
    assert window.samples == 12


def test_windows_without_overlap_and_a_reset_starts_afresh():
    window = SampleWindow(size=3, stride=3, channels=1)
    out = [window.push(np.array([n], np.float32)) for n in range(1, 8)]
    assert [w[:, 0].tolist() for w in out if w is not None] == [[1, 2, 3], [4, 5, 6]]
    window.reset()
    assert [window.push(np.array([n], np.float32)) is None for n in (8, 9)] == [True, True]
    assert window.push(np.array([10], np.float32))[:, 0].tolist() == [8, 9, 10]


def test_a_window_fits_any_input_shape_with_its_element_count():
    window = np.arange(8, dtype=np.float32).reshape(4, 2)  # 4 samples x 2 channels
    tensor, placement = window_to_tensor(window, (1, 4, 2), np.dtype(np.float32))
    assert tensor.shape == (1, 4, 2) and tensor[0, 3, 1] == 7
    assert (placement.input_width, placement.input_height) == (4, 2)
    flat, _ = window_to_tensor(window, (1, 8), np.dtype(np.float32))
    assert flat.tolist() == [list(range(8))]
    dynamic, _ = window_to_tensor(window, (-1, 4, 2), np.dtype(np.float32))
    assert dynamic.shape == (1, 4, 2)
    channels_first, _ = window_to_tensor(window, (1, 2, 4), np.dtype(np.float32))
    assert channels_first[0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]  # one row per channel
    as_int, _ = window_to_tensor(window, (1, 4, 2), np.dtype(np.int32))
    assert as_int.dtype == np.int32
    with pytest.raises(InvalidInput, match=r"a window of 4 samples x 2 channels does not fit model input "
                                           r"\[1, 10\]; set source.window and source.channels"):
        window_to_tensor(window, (1, 10), np.dtype(np.float32))
    with pytest.raises(InvalidInput):
        window_to_tensor(window, (-1, -1), np.dtype(np.float32))


def test_decoders_that_read_images_are_refused_for_windows():
    assert build_decoder({"type": "classification"}, windows=True) is not None
    with pytest.raises(InvalidInput, match="'blazeface' reads images; a sensor pipeline takes classific"):
        build_decoder({"type": "blazeface"}, windows=True)


def test_a_stuck_sensor_is_degraded_until_a_value_moves():
    monitor = SensorQualityMonitor(QualitySettings(stuck_after_s=10, stuck_tolerance=0.05))
    moving = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]], np.float32)
    stuck = np.array([[3.0, 5.0], [3.0, 5.0], [3.02, 5.0]], np.float32)
    assert monitor.check(moving, 3, 0.0) == ""
    assert monitor.check(stuck, 6, 5.0) == ""
    assert monitor.check(stuck, 9, 9.9) == ""
    assert monitor.check(stuck, 12, 12.0) == "sensor stuck on 3.0, 5.0 for 12 s"
    # Only the samples that are new count: the old 1.0 and 2.0 do not make it move.
    assert monitor.check(np.array([[2.0, 5.0], [3.0, 5.0], [3.0, 5.0]], np.float32), 13, 13.0) != ""
    assert monitor.check(np.array([[3.0, 5.0], [3.0, 5.0], [3.0, 5.2]], np.float32), 14, 14.0) == ""


def test_the_stuck_check_can_be_turned_off():
    monitor = SensorQualityMonitor(QualitySettings(stuck_after_s=0))
    still = np.ones((2, 1), np.float32)
    assert monitor.check(still, 2, 0.0) == monitor.check(still, 4, 1000.0) == ""


def test_sensor_source_settings():
    assert SourceSettings(kind="stdin").uri is None
    assert SourceSettings(kind="fifo", uri="/run/s", format="jsonl", fields=["a", "b"]).sample_channels == 2
    assert SourceSettings(kind="fifo", uri="/run/s", columns=[0, 2, 4]).sample_channels == 3
    assert SourceSettings(kind="serial", uri="/dev/ttyUSB0").sample_channels == 1
    assert SourceSettings(kind="iio", uri="iio:device0").sample_channels == 0  # found on opening
    assert SourceSettings(kind="iio", uri="bme280", iio_channels=["in_temp"]).sample_channels == 1
    assert SourceSettings(uri="/dev/video0").is_sensor is False


@pytest.mark.parametrize(("source", "message"), [
    ({"kind": "fifo"}, "uri is required for kind = 'fifo'"),
    ({"kind": "camera"}, "uri is required for kind = 'camera'"),
    ({"kind": "stdin", "uri": "/dev/stdin"}, "kind = 'stdin' takes no uri"),
    ({"kind": "fifo", "uri": "f", "fields": ["a"]}, "fields are for format = 'jsonl'; csv takes columns"),
    ({"kind": "fifo", "uri": "f", "format": "jsonl", "columns": [1]}, "columns are for format = 'csv'"),
    ({"kind": "fifo", "uri": "f", "columns": [-1]}, "columns count from 0"),
    ({"kind": "fifo", "uri": "f", "columns": [0, 1], "channels": 3}, "channels = 3 but 2 fields"),
    ({"kind": "serial", "uri": "/dev/ttyS0", "baud": 12345}, "baud 12345 is not one of 1200, 2400"),
    ({"kind": "serial", "uri": "/dev/ttyS0", "window": 0}, "window: Input should be greater than or equal"),
])
def test_sensor_settings_that_disagree_are_one_line_errors(source, message, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(None, pipelines={"p": {"model": "m", "source": source}})
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert text.startswith("invalid configuration: pipelines.p.source")
