"""The MQTT sink's rules without a broker: what counts as a change, the rate limit, and the
configuration of MQTT sinks and sources. (The sink and source themselves, with a real
broker and daemon, are in test_mqtt_pipelines.py.)"""

from __future__ import annotations

import pytest

from edged.config import ConfigError, SinkSettings, SourceSettings, load_settings
from edged.pipelines.sinks.mqtt import ChangeFilter, RateLimiter, same_result

FACE = {"pipeline": "door", "model": "face", "version": "1", "frame": 7, "time": 1700000000.25,
        "detections": [{"score": 0.93211, "box": [0.31, 0.2, 0.25, 0.33],
                        "keypoints": [[0.4, 0.3], [0.5, 0.3]]}]}


def face(frame: int = 7, time: float = 1700000000.25, score: float = 0.93211,
         box: tuple[float, ...] = (0.31, 0.2, 0.25, 0.33), faces: int = 1) -> dict:
    detection = {"score": score, "box": list(box), "keypoints": [[0.4, 0.3], [0.5, 0.3]]}
    return {**FACE, "frame": frame, "time": time, "detections": [detection] * faces}


def test_frame_window_and_time_never_make_a_change():
    assert same_result(face(), face(frame=8, time=1700000001.0), 0.01)
    window = {"pipeline": "v", "window": 1, "time": 1.0,
              "classes": [{"index": 1, "label": "high", "score": 3.0}]}
    assert same_result(window, {**window, "window": 2, "time": 2.0}, 0.01)


def test_jitter_below_the_tolerance_is_no_change_and_a_move_is():
    jitter = face(score=0.93711, box=(0.3149, 0.2049, 0.2451, 0.3351))
    assert same_result(face(), jitter, 0.01)
    assert not same_result(face(), face(box=(0.33, 0.2, 0.25, 0.33)), 0.01)  # moved 2% of the frame
    assert not same_result(face(), face(score=0.95), 0.01)
    assert same_result(face(), face(box=(0.33, 0.2, 0.25, 0.33)), 0.1)  # change_digits = 1


def test_structure_labels_and_integers_must_be_equal():
    assert not same_result(face(), face(faces=2), 0.01)  # one more face
    assert not same_result(face(), face(faces=0), 0.01)
    low = {"classes": [{"index": 0, "label": "low", "score": 4.0}]}
    high = {"classes": [{"index": 1, "label": "high", "score": 4.0}]}
    assert not same_result(low, high, 0.01)
    assert not same_result({"n": 1}, {"n": 2}, 10.0)  # integers are exact, whatever the tolerance
    assert not same_result({"ok": True}, {"ok": 1}, 0.01)
    assert not same_result({"x": float("nan")}, {"x": float("nan")}, 0.01)
    assert not same_result(face(), {**face(), "version": "2"}, 0.01)  # a new model version is news
    assert not same_result({"a": 1.0}, {"a": 1.0, "b": 2.0}, 0.01)


def test_the_change_filter_compares_with_the_last_published_and_beats():
    changes = ChangeFilter(digits=2, heartbeat_s=10.0)
    assert changes.wanted(face(), now=0.0)  # the first result always goes
    changes.published(face(), now=0.0)
    assert not changes.wanted(face(frame=8), now=1.0)
    # A slow drift, never more than the tolerance from one frame to the next, still shows:
    # the comparison is with the last result published, not the last one seen.
    drift = [0.31 + 0.004 * step for step in range(1, 4)]
    assert [changes.wanted(face(box=(x, 0.2, 0.25, 0.33)), now=2.0) for x in drift] == [False, False, True]
    assert changes.wanted(face(), now=10.0)  # the heartbeat is due, unchanged or not
    changes.published(face(), now=10.0)
    assert not changes.wanted(face(), now=19.9)
    silent = ChangeFilter(digits=2)
    silent.published(face(), now=0.0)
    assert not silent.wanted(face(), now=1e9)


def test_the_rate_limiter_allows_at_most_the_rate_over_any_stretch():
    limiter = RateLimiter(rate_hz=10.0)
    frames = [n / 30.0 for n in range(300)]  # 10 s of a 30 fps camera
    allowed = [t for t in frames if limiter.allow(t)]
    assert len(allowed) == 100  # exactly every third frame: float error does not make it 7.5 Hz
    for start in frames:  # any one-second stretch: at most 1 + rate
        assert sum(start <= t < start + 1.0 for t in allowed) <= 11

    slow = RateLimiter(rate_hz=0.5)
    assert [slow.allow(t) for t in (0.0, 0.5, 1.9, 2.0, 2.1, 100.0, 100.1)] == [
        True, False, False, True, False, True, False]  # a quiet spell buys no burst


def test_sink_options_are_checked_against_the_kind():
    sink = SinkSettings(kind="mqtt", max_rate_hz=2, on_change=True, change_digits=1, heartbeat_s=60)
    assert sink.path is None
    cases = [
        ({}, "path is required for kind = 'jsonl'"),
        ({"path": "/tmp/r.jsonl", "on_change": True}, "on_change: only for kind = 'mqtt'"),
        ({"path": "/tmp/r.jsonl", "max_rate_hz": 5}, "max_rate_hz: only for kind = 'mqtt'"),
        ({"kind": "mqtt", "path": "/tmp/r.jsonl"}, "kind = 'mqtt' takes no path"),
        ({"kind": "mqtt", "backups": 5}, "backups: only for kind = 'jsonl'"),
        ({"kind": "mqtt", "heartbeat_s": 30}, "heartbeat_s: only with on_change = true"),
        ({"kind": "mqtt", "max_rate_hz": -1}, "greater than or equal to 0"),
        ({"kind": "smtp"}, "'jsonl', 'mqtt' or 'snapshot'"),
        ({"kind": "snapshot", "max_rate_hz": 5}, "max_rate_hz: not for kind = 'snapshot'"),
        ({"path": "/tmp/r.jsonl", "history": 5}, "history: only for kind = 'snapshot'"),
    ]
    for keys, message in cases:
        with pytest.raises(ConfigError) as info:
            load_settings(None, mqtt={"enabled": True}, pipelines={"door": {
                "model": "face", "source": {"uri": "/dev/video0"}, "sinks": [keys]}})
        text = str(info.value)
        assert message in text and "pipelines.door.sinks.0" in text and "\n" not in text, text


@pytest.mark.parametrize("topic_filter", ["sensors/+/vibration", "sensors/#", "#", "+", "a/b/c", "a//b",
                                          "plant 1/line-2/t"])
def test_valid_topic_filters(topic_filter):
    assert SourceSettings(kind="mqtt", uri=topic_filter).uri == topic_filter


@pytest.mark.parametrize(("topic_filter", "reason"), [
    ("$SYS/#", "topics starting with '$' are the broker's"),
    ("$share/group/sensors", "topics starting with '$' are the broker's"),
    ("sensors/#/x", "'#' must be a whole level, the last one"),
    ("sensors#", "'#' must be a whole level, the last one"),
    ("sensors/a+", "'+' must be a whole level"),
    ("a\0b", "holds a NUL character"),
])
def test_invalid_topic_filters_are_refused_in_one_line(topic_filter, reason):
    with pytest.raises(ConfigError) as info:
        load_settings(None, mqtt={"enabled": True}, pipelines={"vib": {
            "model": "win", "source": {"kind": "mqtt", "uri": topic_filter}}})
    assert reason in str(info.value) and "pipelines.vib.source" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_mqtt_source_is_a_line_sensor():
    source = SourceSettings(kind="mqtt", uri="s/+/v", format="jsonl", fields=["x", "y"], window=8, stride=4)
    assert source.is_sensor and source.sample_channels == 2
    with pytest.raises(ValueError, match="uri is required for kind = 'mqtt'"):
        SourceSettings(kind="mqtt")


@pytest.mark.parametrize(("pipeline", "says"), [
    ({"model": "win", "source": {"kind": "mqtt", "uri": "sensors/#"}},
     "pipeline 'vib' reads its source over MQTT: it needs mqtt.enabled"),
    ({"model": "win", "source": {"kind": "fifo", "uri": "/run/s.fifo"}, "enabled": False,
      "sinks": [{"path": "/tmp/r.jsonl"}, {"kind": "mqtt"}]},
     "pipeline 'vib' publishes results over MQTT: it needs mqtt.enabled"),
])
def test_a_pipeline_using_mqtt_is_refused_without_mqtt(pipeline, says):
    with pytest.raises(ConfigError) as info:
        load_settings(None, pipelines={"vib": pipeline})
    assert str(info.value) == f"invalid configuration: {says}"
    assert load_settings(None, mqtt={"enabled": True}, pipelines={"vib": pipeline}).pipelines["vib"]
