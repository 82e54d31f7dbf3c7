"""The health document's system figures, read from real /proc and /sys files."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edged.config import load_settings
from edged.health import CpuMeter, Health, free_bytes, meminfo, rss_bytes, temperatures
from edged.metrics import MetricsPage, health_metrics
from edged.models.manager import ModelManager
from edged.models.store import ModelStore


def test_thermal_zones_are_read_by_type_and_broken_ones_left_out(tmp_path: Path) -> None:
    zones = [("cpu-thermal", "51234"), ("gpu", "40000"), ("cpu-thermal", "1000"), ("broken", "n/a")]
    for index, (kind, milli) in enumerate(zones):
        zone = tmp_path / f"thermal_zone{index}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    assert temperatures(tmp_path) == {"cpu-thermal": 51.2, "gpu": 40.0, "cpu-thermal.thermal_zone2": 1.0}
    assert temperatures(tmp_path / "missing") == {}


def test_process_and_disk_figures_are_real(tmp_path: Path) -> None:
    big = bytearray(64 << 20)  # resident memory grows when pages are touched
    big[::4096] = b"x" * len(big[::4096])
    assert rss_bytes() > 64 << 20
    assert meminfo()["MemTotal"] > meminfo()["MemAvailable"] > 0
    assert free_bytes(tmp_path / "not" / "yet" / "made") > 0  # the nearest existing parent
    meter = CpuMeter()
    sum(i * i for i in range(300_000))
    assert meter.percent() > 0


def test_the_document_and_metrics_agree(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    settings = load_settings(None, store={"path": tmp_path / "store"})
    health = Health(ModelManager(store, settings), store.root)
    door = {"state": "degraded", "processed_fps": 4.5, "source_fps": 5.0, "dropped": 3, "errors": 0}
    health.sections["pipelines"] = lambda: {"door": door}
    health.sections["broken"] = lambda: 1 / 0
    document = health.document()
    assert document["broken"] == {"error": "ZeroDivisionError: division by zero"}  # the rest still reported
    assert document["system"]["memory_rss_bytes"] > 0 and document["uptime_s"] >= 0
    text = MetricsPage()
    health_metrics(text, document)
    page = text.render()[0].decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(page) for s in family.samples}
    assert samples[("edged_pipeline_dropped_total", (("pipeline", "door"),))] == 3
    assert samples[("edged_pipeline_state", (("pipeline", "door"), ("state", "degraded")))] == 1
    assert samples[("edged_process_resident_memory_bytes", ())] == document["system"]["memory_rss_bytes"]
