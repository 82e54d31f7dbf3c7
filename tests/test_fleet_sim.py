"""tools/fleet_sim.py end to end at a tiny size: 6 simulated devices in 2 worker processes,
a private Mosquitto, two real `edged-registry serve` instances, a 1 MB model in 64 KiB
chunks. Checks that every device converged and that the report's figures agree with each
other (no timing thresholds: the machine may be busy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 6


def test_six_devices_converge_and_the_figures_agree(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fleet_sim.py"), "--devices", str(DEVICES),
         "--model-mb", "1", "--processes", "2", "--registries", "2", "--chunk-kib", "64", "--idle-s", "1",
         "--probation-s", "0.5", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    r = json.loads(out.read_text())
    assert "result" in done.stdout and "OK" in done.stdout

    # Every device ran the real update: started, downloaded, tested, activated, kept; its
    # retained state (the operator's view) and its own manager agree.
    assert (r["devices_started"]["connected"], r["devices_started"]["loaded"]) == (DEVICES, DEVICES)
    assert r["active_v2"] == {"state": DEVICES, "devices_own_view": DEVICES, "kept_after_probation": DEVICES}
    for kind in ("update_started", "update_downloaded", "update_staged", "update_tested",
                 "update_activated", "update_kept"):
        assert r["events"][kind] == DEVICES, r["events"]
    assert r["failures"] == r["refusals"] == r["rollbacks"] == 0

    # Bytes: each device accepted exactly the release (model and self-test files), and what
    # reached the devices is what the two instances served, chunk for chunk.
    release = r["scenario"]["release_bytes"]
    assert release > r["scenario"]["model_bytes"]
    b = r["bytes_per_device_over_model"]
    assert b["accepted_mean"] == b["release_over_model"] == round(release / r["scenario"]["model_bytes"], 4)
    assert b["delivered_mean"] >= b["accepted_mean"]
    served = r["registry_served_chunks"]
    assert len(served) == 2 and all(n and n > 0 for n in served), served  # both shared the load
    assert r["registry_busy"] == [0, 0] and sum(served) == r["delivered_chunks"]  # every reply a chunk
    assert abs(r["delivered_bytes"] - DEVICES * b["delivered_mean"] * r["scenario"]["model_bytes"]) < 1e4

    # Rates derived from the same counters.
    assert r["registry_cpu_s"] > 0
    per_gb = r["registry_cpu_s"] / (r["delivered_bytes"] / 1e9)
    assert abs(r["registry_cpu_s_per_gb"] - per_gb) <= 0.01 * per_gb + 0.01
    assert r["raw"]["bytes"] >= DEVICES * r["scenario"]["model_bytes"] and r["raw_mb_s"] > 0
    assert r["aggregate_over_raw"] == round(r["aggregate_mb_s"] / r["raw_mb_s"], 3)
    # Retained: each device's status and state, and the registry's status (the release too,
    # once $SYS counted it: it updates every second).
    assert r["broker"]["retained"] >= 2 * DEVICES + 1
    assert r["broker"]["publish_per_s"] > 0

    # CPU accounting, both paths side by side: the raw window's broker, publishers and
    # subscribers (each its own /proc/.../stat), and per GB; central = sending + broker.
    # At this size the raw window lasts a tenth of a second, a few clock ticks: a part
    # may read 0, so positivity is asserted where the run is long enough to be sure of it.
    raw = r["raw"]
    for name in ("broker", "publishers", "subscribers"):
        assert raw[f"{name}_cpu_s"] >= 0, raw
        assert abs(raw[f"{name}_cpu_s_per_gb"] - raw[f"{name}_cpu_s"] / (raw["bytes"] / 1e9)) < 1e-6
    c = r["cpu_per_gb"]
    for side in ("raw", "edged"):
        assert set(c[side]) == {"broker", "sending", "receiving", "central"}, c
        assert all(v >= 0 for v in c[side].values()), c
        assert abs(c[side]["central"] - c[side]["broker"] - c[side]["sending"]) <= 0.002, c
        assert r["central_cpu_s_per_gb"][side] == c[side]["central"]
    gb = r["delivered_bytes"] / 1e9
    assert c["edged"]["sending"] > 0 and c["edged"]["receiving"] > 0  # serve and devices: whole seconds
    assert abs(c["edged"]["sending"] - r["registry_cpu_s"] / gb) <= 0.01 * c["edged"]["sending"] + 0.01
    assert abs(c["raw"]["broker"] - raw["broker_cpu_s_per_gb"]) <= 0.001
    assert abs(c["raw"]["receiving"] - raw["subscribers_cpu_s_per_gb"]) <= 0.001
    assert r["central_ratio"] == c["central_ratio"] >= 0
    assert abs(r["central_ratio"] - c["raw"]["central"] / c["edged"]["central"]) <= 0.001
    assert abs(c["receiving_ratio"] - c["raw"]["receiving"] / c["edged"]["receiving"]) <= 0.001


def test_the_central_side_alone_is_measured_against_raw_with_nothing_refused() -> None:
    """tools/fleet_sim/central.py at a small size: two real `serve` over one store answer 20
    requesters for 0.3 GB, alternating with the raw path; each round is a line of figures."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.fleet_sim.central", "--devices", "20", "--gb", "0.3", "--rounds", "2",
         "--registries", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    rounds = [line for line in done.stdout.splitlines() if line.startswith("raw: pub ")]
    assert len(rounds) == 2, done.stdout
    assert all("| edged: serve " in line and "central raw/edged " in line for line in rounds)
    summary = done.stdout.splitlines()[-1]
    assert "20 requesters x 2, 2 serve, 0.3 GB per path per round, refusals 0" in summary, summary
    assert "median central raw/edged (target >= 0.50) " in summary
