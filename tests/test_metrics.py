"""Unit tests for latency histograms and the metrics page (Prometheus text and OpenMetrics)."""

from __future__ import annotations

import itertools
import math
import re
import threading

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from edged.metrics import LATENCY_BUCKETS, Histogram, MetricsPage, ModelStats, inference_metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_labels(text: str) -> dict[str, str]:
    """Parse a label set the way Prometheus does (unescaping \\\\, \\" and \\n)."""
    labels, pos = {}, 0
    while pos < len(text):
        match = LABEL.match(text, pos)
        assert match, f"bad label set at {text[pos:]!r}"
        raw = match.group(2)
        labels[match.group(1)] = re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), raw)
        pos = match.end()
    return labels


def parse(text: bytes) -> list[tuple[str, dict[str, str], float]]:
    """Every sample line of an exposition, checking comment placement as it goes."""
    samples, described = [], set()
    for line in text.decode().split("\n")[:-1]:
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            described.add(line.split()[2])
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in described or family in described, f"{name} appears before its # TYPE"
        value = float(match.group(4).replace("+Inf", "inf"))
        samples.append((name, parse_labels(match.group(3) or ""), value))
    return samples


# --- buckets -----------------------------------------------------------------------------
def test_latency_buckets_are_increasing_from_50us_to_10s() -> None:
    assert LATENCY_BUCKETS[0] == 0.00005
    assert LATENCY_BUCKETS[-1] == 10.0
    assert all(a < b for a, b in itertools.pairwise(LATENCY_BUCKETS))
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS[:-1])]
    assert all(1.49 < r < 1.51 for r in ratios)


# --- Histogram ----------------------------------------------------------------------------
def test_an_empty_histogram_has_no_quantiles() -> None:
    hist = Histogram()
    assert hist.quantile(0.5) is None
    assert hist.count == 0
    assert hist.total == 0.0
    assert hist.summary_ms() == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_observe_counts_each_value_in_the_bucket_of_its_upper_bound() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    for value in (0.0, 1.0, 1.0000001, 2.0, 4.9, 5.0, 5.1, 1e9):
        hist.observe(value)
    assert hist.counts == [2, 2, 2, 2]  # <=1, <=2, <=5, above the last bound
    assert hist.count == 8
    assert math.isclose(hist.total, sum((0.0, 1.0, 1.0000001, 2.0, 4.9, 5.0, 5.1, 1e9)))


def test_quantiles_are_bucket_upper_bounds() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    for value in [0.5] * 50 + [1.5] * 45 + [4.0] * 4 + [100.0]:
        hist.observe(value)
    assert hist.quantile(0.01) == 1.0
    assert hist.quantile(0.5) == 1.0
    assert hist.quantile(0.51) == 2.0
    assert hist.quantile(0.95) == 2.0
    assert hist.quantile(0.96) == 5.0
    assert hist.quantile(0.99) == 5.0
    assert hist.quantile(1.0) == math.inf
    assert hist.summary_ms() == {"p50_ms": 1000.0, "p95_ms": 2000.0, "p99_ms": 5000.0}


def test_quantiles_of_one_value() -> None:
    hist = Histogram()
    hist.observe(0.003)
    bound = min(b for b in LATENCY_BUCKETS if b >= 0.003)
    for q in (0.5, 0.95, 0.99, 1.0):
        assert hist.quantile(q) == bound
    assert hist.summary_ms()["p50_ms"] == round(bound * 1000, 3)


def test_quantiles_never_decrease() -> None:
    hist = Histogram()
    for i in range(1, 2001):
        hist.observe(i / 1000)  # 1 ms .. 2 s
    qs = [hist.quantile(q / 100) for q in range(1, 101)]
    assert qs == sorted(qs)
    p50 = hist.quantile(0.5)
    assert 1.0 <= p50 <= 1.5  # the true median, 1.0 s, lies in the bucket ending at p50


def test_observe_is_thread_safe() -> None:
    hist = Histogram()

    def work() -> None:
        for _ in range(5000):
            hist.observe(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hist.count == 20000
    assert sum(hist.counts) == 20000


def test_model_stats() -> None:
    stats = ModelStats()
    stats.errors += 2
    stats.rejected += 1
    stats.latency.observe(0.002)
    assert stats.requests == 1
    data = stats.as_dict()
    assert data["requests"] == 1
    assert data["errors"] == 2
    assert data["rejected"] == 1
    assert set(data["latency"]) == {"p50_ms", "p95_ms", "p99_ms"}
    assert data["latency"]["p50_ms"] >= 2.0
    assert data["internal"] == {"requests": 0, "errors": 0, "rejected": 0,
                                "latency": {"p50_ms": None, "p95_ms": None, "p99_ms": None}}


def test_internal_inferences_are_counted_and_exposed_apart_from_clients() -> None:
    stats = ModelStats()
    stats.latency.observe(0.002)
    stats.errors += 1
    for _ in range(3):
        stats.internal.latency.observe(5.0)
    stats.internal.errors += 2
    assert (stats.requests, stats.errors, stats.internal.requests) == (1, 1, 3)
    assert stats.backend_errors == 3  # what probation watches: a failing watchdog check counts
    assert stats.as_dict()["latency"]["p99_ms"] < 5000  # the slow internal ones stay out
    text = MetricsPage()
    inference_metrics(text, [("face", stats)])
    samples = {(name, labels.get("le")): value for name, labels, value in parse(text.render()[0])}
    assert samples[("edged_inference_seconds_count", None)] == 1
    assert samples[("edged_inference_errors_total", None)] == 1
    assert samples[("edged_internal_inference_seconds_count", None)] == 3
    assert samples[("edged_internal_inference_errors_total", None)] == 2
    assert samples[("edged_internal_inference_rejected_total", None)] == 0


# --- Prometheus text ------------------------------------------------------------------------
def exposition() -> tuple[bytes, Histogram]:
    hist = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.05, 0.05, 0.5, 0.5, 0.5, 7.0):
        hist.observe(value)
    text = MetricsPage()
    text.family("edged_requests_total", "counter", "Inferences that succeeded.")
    text.sample("edged_requests_total", 7, {"model": "face"})
    text.sample("edged_requests_total", 0, {"model": "selfie"})
    text.family("edged_up", "gauge", "1 when serving.")
    text.sample("edged_up", 1)
    text.family("edged_latency_seconds", "histogram", "Inference latency.")
    text.histogram("edged_latency_seconds", hist, {"model": "face"})
    return text.render()[0], hist


def test_help_and_type_come_before_the_samples_of_their_family() -> None:
    body, _ = exposition()
    lines = body.decode().splitlines()
    assert body.endswith(b"\n")
    assert lines[0] == "# HELP edged_requests_total Inferences that succeeded."
    assert lines[1] == "# TYPE edged_requests_total counter"
    for family in ("edged_requests_total", "edged_up", "edged_latency_seconds"):
        help_at = lines.index(next(line for line in lines if line.startswith(f"# HELP {family} ")))
        type_at = lines.index(next(line for line in lines if line.startswith(f"# TYPE {family} ")))
        first_sample = next(i for i, line in enumerate(lines) if line.startswith(family) and i > type_at)
        assert help_at < type_at < first_sample
    assert len(parse(body)) == 3 + 4 + 2


def test_samples_and_labels() -> None:
    samples = parse(exposition()[0])
    assert ("edged_requests_total", {"model": "face"}, 7.0) in samples
    assert ("edged_requests_total", {"model": "selfie"}, 0.0) in samples
    assert ("edged_up", {}, 1.0) in samples


def test_histogram_buckets_are_cumulative_and_inf_equals_count() -> None:
    body, hist = exposition()
    samples = parse(body)
    buckets = [(labels["le"], v) for name, labels, v in samples if name == "edged_latency_seconds_bucket"]
    assert buckets == [("0.01", 1.0), ("0.1", 3.0), ("1.0", 6.0), ("+Inf", 7.0)]
    values = [v for _, v in buckets]
    assert values == sorted(values)
    [count] = [v for name, _, v in samples if name == "edged_latency_seconds_count"]
    [total] = [v for name, _, v in samples if name == "edged_latency_seconds_sum"]
    assert count == 7.0 == hist.count == buckets[-1][1]
    assert math.isclose(total, 0.005 + 0.05 * 2 + 0.5 * 3 + 7.0)
    for name, labels, _ in samples:
        if name.startswith("edged_latency_seconds"):
            assert labels["model"] == "face"


def test_an_empty_histogram_renders_zeros() -> None:
    text = MetricsPage()
    text.family("h", "histogram", "empty")
    text.histogram("h", Histogram(), {})
    samples = parse(text.render()[0])
    buckets = [s for s in samples if s[0] == "h_bucket"]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert all(value == 0 for _, _, value in samples)
    assert buckets[-1][1] == {"le": "+Inf"}
    # every bound can be read back as the float it is
    assert [float(labels["le"]) for _, labels, _ in buckets[:-1]] == list(LATENCY_BUCKETS)


@pytest.mark.parametrize(
    "value", ['plain', 'quote"d', "back\\slash", 'both\\"', "new\nline", "trail\\", "", "ünïcode"]
)
def test_label_values_are_escaped_and_read_back_exactly(value: str) -> None:
    text = MetricsPage()
    text.family("m", "gauge", "a gauge")
    text.sample("m", 1, {"model": value, "version": "1"})
    body, _ = text.render()
    assert body.decode().count("\n") == 3  # HELP, TYPE, one sample: nothing broke the line
    [(name, labels, sample)] = parse(body)
    assert (name, sample) == ("m", 1.0)
    assert labels == {"model": value, "version": "1"}


def test_openmetrics_when_the_scraper_asks_for_it_read_back_by_a_strict_parser() -> None:
    """Prometheus asks for OpenMetrics first; its `# EOF`, counter naming and content type
    are prometheus_client's, and its own strict parser reads every figure back."""
    _, hist = exposition()
    text = MetricsPage()
    text.family("edged_requests_total", "counter", "Inferences that succeeded.")
    text.sample("edged_requests_total", 7, {"model": 'fa"ce\\'})
    text.family("edged_latency_seconds", "histogram", "Inference latency.")
    text.histogram("edged_latency_seconds", hist, {"model": "face"})
    page, content_type = text.render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert page.endswith(b"# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    [requests] = families["edged_requests"].samples
    assert (requests.name, requests.value) == ("edged_requests_total", 7)
    assert requests.labels == {"model": 'fa"ce\\'}
    buckets = [(s.labels["le"], s.value) for s in families["edged_latency_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets == [("0.01", 1), ("0.1", 3), ("1.0", 6), ("+Inf", 7)]
    assert MetricsPage().render()[1] == "text/plain; version=0.0.4; charset=utf-8"  # no Accept: plain text
