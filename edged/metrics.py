"""Counters and latency histograms, and the metrics page made from them.

Histograms use fixed buckets so recording is one bisect and one add, cheap
enough for the request path; quantiles are read from the buckets.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

# Seconds: 50 us .. 10 s, roughly x1.5 apart.
LATENCY_BUCKETS: tuple[float, ...] = (
    *(round(0.00005 * 1.5**i, 7) for i in range(31) if 0.00005 * 1.5**i < 10.0), 10.0
)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[index] += 1
            self.total += value
            self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-th value (None when empty)."""
        with self._lock:
            counts, count = list(self.counts), self.count
        if count == 0:
            return None
        rank = q * count
        seen = 0
        for index, n in enumerate(counts):
            seen += n
            if seen >= rank:
                return self.buckets[index] if index < len(self.buckets) else float("inf")
        return float("inf")

    def summary_ms(self) -> dict[str, float | None]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        return {f"p{int(q * 100)}_ms": ms(self.quantile(q)) for q in (0.5, 0.95, 0.99)}


class MetricsPage:
    """One scrape's metric families, written out by prometheus_client in the format the
    scraper asks for: the Prometheus text format, or OpenMetrics when its Accept header
    prefers it (as Prometheus 2.x and later do). The figures come from edged's own cheap
    counters and histograms; only the exposition is the library's (escaping, number
    formatting, `_total` and `# EOF` rules, content negotiation)."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a family; the samples that follow belong to it. A counter's name ends in
        `_total`, which prometheus_client adds to its samples itself."""
        base = name.removesuffix("_total") if kind == "counter" else name
        self._families.append(Metric(base, help_text, kind))

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self._families[-1].add_sample(name, labels or {}, value)

    def histogram(self, name: str, hist: Histogram, labels: dict[str, str]) -> None:
        with hist._lock:
            counts, total, count = list(hist.counts), hist.total, hist.count
        cumulative = 0
        for bound, n in zip(hist.buckets, counts, strict=False):
            cumulative += n
            self.sample(f"{name}_bucket", cumulative, {**labels, "le": floatToGoString(bound)})
        self.sample(f"{name}_bucket", count, {**labels, "le": "+Inf"})
        self.sample(f"{name}_count", count, labels)
        self.sample(f"{name}_sum", total, labels)

    def collect(self) -> list[Metric]:
        """What prometheus_client's encoders read (the collector protocol)."""
        return self._families

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The page and its content type, for a scraper that sent `accept`."""
        encode, content_type = choose_encoder(accept)
        return encode(self), content_type


class Counts:
    """Inferences of one kind for one model: failed, refused, and timed successes."""

    def __init__(self) -> None:
        self.errors = 0  # the backend failed
        self.rejected = 0  # the request was invalid
        self.latency = Histogram()

    @property
    def requests(self) -> int:
        """Inferences that succeeded (each one is timed)."""
        return self.latency.count

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "errors": self.errors, "rejected": self.rejected,
            "latency": self.latency.summary_ms(),
        }


class ModelStats(Counts):
    """What the daemon counts for one model name, across its versions. The top-level counts
    are client traffic (the socket, pipelines, MQTT commands); the daemon's own inferences
    (watchdog checks, update self-tests) go to `internal`, so they never make up requests,
    dilute errors or pull latency percentiles towards an idle model's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.internal = Counts()

    @property
    def backend_errors(self) -> int:
        """Backend failures of client and internal inferences alike: what probation watches."""
        return self.errors + self.internal.errors

    def as_dict(self) -> dict:
        return {**super().as_dict(), "internal": self.internal.as_dict()}


def inference_metrics(text: MetricsPage, stats_by_model: list[tuple[str, ModelStats]]) -> None:
    """Per-model inference families: client traffic, then the daemon's own inferences."""
    _count_families(text, "edged_inference", "Client inferences", stats_by_model)
    _count_families(text, "edged_internal_inference", "Watchdog and update self-test inferences",
                    [(name, stats.internal) for name, stats in stats_by_model])


def _count_families(text: MetricsPage, prefix: str, who: str, rows: Sequence[tuple[str, Counts]]) -> None:
    text.family(f"{prefix}_errors_total", "counter", f"{who} the backend failed.")
    for name, counts in rows:
        text.sample(f"{prefix}_errors_total", counts.errors, {"model": name})
    text.family(f"{prefix}_rejected_total", "counter", f"{who} refused as invalid.")
    for name, counts in rows:
        text.sample(f"{prefix}_rejected_total", counts.rejected, {"model": name})
    text.family(f"{prefix}_seconds", "histogram", f"{who}: time spent in the backend per inference.")
    for name, counts in rows:
        text.histogram(f"{prefix}_seconds", counts.latency, {"model": name})


def health_metrics(text: MetricsPage, doc: dict) -> None:
    """The health document's pipeline, system and MQTT figures, as Prometheus families."""
    pipelines = doc.get("pipelines") or {}
    for name, kind, help_text, key in (
        ("edged_pipeline_processed_fps", "gauge", "Frames or windows through the model per second.",
         "processed_fps"),
        ("edged_pipeline_source_fps", "gauge", "Frames or windows the source delivers per second.",
         "source_fps"),
        ("edged_pipeline_dropped_total", "counter", "Inputs dropped because the model was busy.", "dropped"),
        ("edged_pipeline_errors_total", "counter", "Inputs that failed in a stage.", "errors"),
    ):
        text.family(name, kind, help_text)
        for pipeline, info in sorted(pipelines.items()):
            text.sample(name, info.get(key, 0), {"pipeline": pipeline})
    text.family("edged_pipeline_state", "gauge", "1 for the state each pipeline is in.")
    for pipeline, info in sorted(pipelines.items()):
        text.sample("edged_pipeline_state", 1, {"pipeline": pipeline, "state": info.get("state", "")})
    system = doc.get("system") or {}
    for name, help_text, key in (
        ("edged_process_cpu_percent", "CPU use of the daemon since the last reading, % of one core.",
         "cpu_percent"),
        ("edged_process_resident_memory_bytes", "Resident memory of the daemon.", "memory_rss_bytes"),
        ("edged_memory_available_bytes", "Memory available on the device.", "memory_available_bytes"),
        ("edged_store_free_bytes", "Free disk space under the model store.", "store_free_bytes"),
    ):
        if system.get(key) is not None:
            text.family(name, "gauge", help_text)
            text.sample(name, system[key])
    text.family("edged_temperature_celsius", "gauge", "Thermal zone temperatures.")
    for zone, celsius in sorted((system.get("temperatures_c") or {}).items()):
        text.sample("edged_temperature_celsius", celsius, {"zone": zone})
    mqtt = doc.get("mqtt") or {}
    if mqtt.get("enabled"):
        text.family("edged_mqtt_connected", "gauge", "1 while connected to the broker.")
        text.sample("edged_mqtt_connected", int(bool(mqtt.get("connected"))))
        text.family("edged_mqtt_reconnects_total", "counter", "Connections to the broker after the first.")
        text.sample("edged_mqtt_reconnects_total", mqtt.get("reconnects", 0))
        outbox = mqtt.get("outbox") or {}
        text.family("edged_outbox_backlog", "gauge", "Messages waiting in the outbox.")
        for kind, count in sorted((outbox.get("by_kind") or {}).items()):
            text.sample("edged_outbox_backlog", count, {"kind": kind})
        text.family("edged_outbox_dropped_total", "counter", "Messages dropped because the outbox was full.")
        for kind, count in sorted((outbox.get("dropped") or {}).items()):
            text.sample("edged_outbox_dropped_total", count, {"kind": kind})
