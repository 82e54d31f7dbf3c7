"""The simulator's figures from what it recorded, and the table it prints."""

from __future__ import annotations

import json
import re
import statistics
from typing import Any

BUSY = re.compile(r"\((\d+) busy")
SERVED = re.compile(r"served (\d+) chunks \((\d+) bytes\)")


def _delta(before: dict, after: dict, group: str) -> float:
    return sum(a - b for a, b in zip(after["cpu_s"][group], before["cpu_s"][group], strict=True))


def figures(*, args: Any, models: dict, ids: list[str], ready: list[dict], start_s: float, idle: dict,
            baseline: dict, before: dict, after: dict, t0: float, converged: float, observer: Any,
            final: dict[str, dict], serve_lines: list[str], killed: dict | None, waves: list[list[str]],
            faulty: set[str], registry: Any, memory: dict) -> dict[str, Any]:
    size = models["v2_bytes"]
    started_events = observer.device_events("update_started", "2")
    release = started_events[0][2].get("bytes", size) if started_events else size  # model + self-test
    seconds = converged - t0
    downloaded = [t for t, _d, _e in observer.device_events("update_downloaded", "2")]
    window_s = (max(downloaded) - t0) if downloaded else float("nan")
    delivered = [f["delivered_bytes"] for f in final.values()]
    accepted = [f["accepted_bytes"] for f in final.values()]
    registry_cpu = _delta(before, after, "serves")
    ours = _delta(before, after, "workers") + registry_cpu + _delta(before, after, "broker")
    machine = after["machine_cpu_s"] - before["machine_cpu_s"]
    sys_before, sys_after = before["sys"], after["sys"]
    wall = after["time"] - before["time"]

    own_sys = after["sys_seen"] - before["sys_seen"]  # $SYS messages to the observer: not the fleet's

    def rate(*names: str, minus: int = 0) -> float:
        return (sum(sys_after[n] - sys_before[n] for n in names) - minus) / wall

    active = sum(f["active"].get("wide") == "2" for f in final.values())
    kinds = dict(observer.kinds)
    result: dict[str, Any] = {
        "scenario": {"devices": len(ids), "processes": args.processes, "registries": args.registries,
                     "kill_at": args.kill_at, "rollout": args.rollout, "faulty": sorted(faulty),
                     "model_bytes": size, "release_bytes": release, "chunk_bytes": args.chunk_kib << 10,
                     "window": args.window},
        "devices_started": {"connected": sum(r["ready"] for r in ready),
                            "loaded": sum(r["loaded"] for r in ready),
                            "seconds": round(start_s, 1)},
        "converge_s": round(seconds, 2),
        "download_window_s": round(window_s, 2),
        "active_v2": {"state": observer.count("2"), "devices_own_view": active,
                      "kept_after_probation": len(observer.device_events("update_kept", "2"))},
        "bytes_per_device_over_model": {
            "delivered_mean": round(statistics.mean(delivered) / size, 4) if delivered else None,
            "delivered_max": round(max(delivered) / size, 4) if delivered else None,
            "accepted_mean": round(statistics.mean(accepted) / size, 4) if accepted else None,
            "release_over_model": round(release / size, 4)},
        "delivered_bytes": sum(delivered),
        "delivered_gb": round(sum(delivered) / 1e9, 3),
        "aggregate_mb_s": round(len(downloaded) * release / window_s / 1e6, 1) if downloaded else None,
        "raw_mb_s": round(baseline["mb_per_s"], 1),
        "raw": baseline,
        "registry_cpu_s": round(registry_cpu, 2),
        "registry_cpu_s_per_gb": round(registry_cpu / (sum(delivered) / 1e9), 2) if sum(delivered) else None,
        "broker": {"messages_per_s": round(rate("messages/received", "messages/sent", minus=own_sys), 1),
                   "publish_per_s": round(rate("publish/messages/received", "publish/messages/sent",
                                               minus=own_sys), 1),
                   "mb_sent_per_s": round(rate("bytes/sent") / 1e6, 1),
                   "cpu_s": round(_delta(before, after, "broker"), 2),
                   "retained": sys_after["retained messages/count"] - after["sys_topics"],
                   "clients": sys_after["clients/connected"]},
        "idle": {**{k: round(v, 2) for k, v in idle.items()},
                 "publish_per_device_per_min": round(
                     60 * (idle["publish_in_per_s"] + idle["publish_out_per_s"]) / len(ids), 2)},
        "events": {k: v for k, v in sorted(kinds.items()) if k.startswith("update_")},
        "failures": kinds.get("update_failed", 0), "refusals": kinds.get("update_refused", 0),
        "rollbacks": kinds.get("update_rolled_back", 0),
        "chunks_retried": sum(f["chunks_retried"] for f in final.values()),
        "reconnects": sum(max(0, f["connections"] - 1) for f in final.values()),
        "registry_busy": [int(m[1]) if (m := BUSY.search(line)) else None for line in serve_lines],
        "registry_served_chunks": [int(m[1]) if (m := SERVED.search(line)) else None for line in serve_lines],
        "delivered_chunks": sum(f["delivered_chunks"] for f in final.values()),
        "memory_mib": memory,
        "release_envelope_bytes": _size(registry.workdir / "root" / "models" / "wide" / "2" / "release.json"),
        "serve_final_lines": serve_lines,
        "killed": killed,
        "cpu": {"devices_s": round(_delta(before, after, "workers"), 1), "registry_s": round(registry_cpu, 1),
                "broker_s": round(_delta(before, after, "broker"), 1), "machine_s": round(machine, 1),
                "others_s": round(machine - ours, 1), "wall_s": round(wall, 1),
                "devices_s_per_update": round(_delta(before, after, "workers") / len(ids), 3)},
    }
    result["aggregate_over_raw"] = (round(result["aggregate_mb_s"] / result["raw_mb_s"], 3)
                                    if result["aggregate_mb_s"] else None)
    result["cpu_per_gb"] = cpu_per_gb(baseline, sum(delivered), registry_cpu, _delta(before, after, "broker"),
                                      _delta(before, after, "workers"))
    result["central_cpu_s_per_gb"] = {side: result["cpu_per_gb"][side]["central"]
                                      for side in ("raw", "edged")}
    result["central_ratio"] = result["cpu_per_gb"]["central_ratio"]
    if args.rollout:
        result["rollout"] = rollout_outcome(observer, registry, waves, faulty)
        result["ok"] = result["rollout"]["ok"]
    else:
        result["ok"] = active == len(ids) == observer.count("2") and not (
            result["failures"] or result["refusals"] or result["rollbacks"])
    return result


def cpu_per_gb(baseline: dict, delivered: int, serves_cpu: float, broker_cpu: float,
               devices_cpu: float) -> dict[str, Any]:
    """CPU seconds per GB delivered, both paths side by side. Central: what the sending
    side and the broker spend (raw: the publishers and Mosquitto over the raw window;
    edged: every `serve` and Mosquitto from the release to all active). Receiving: the raw
    subscribers against the simulated devices (chunk transfer, verification, store,
    staging, self-test, reporting). `central_ratio` = raw central / edged central: the
    throughput a central host's cores reach on edged's path relative to the bare broker
    path, with the devices on their own machines."""
    raw_gb, gb = baseline["bytes"] / 1e9, delivered / 1e9
    raw = {"broker": baseline["broker_cpu_s"] / raw_gb, "sending": baseline["publishers_cpu_s"] / raw_gb,
           "receiving": baseline["subscribers_cpu_s"] / raw_gb}
    raw["central"] = raw["broker"] + raw["sending"]
    if gb:
        edged = {"broker": broker_cpu / gb, "sending": serves_cpu / gb, "receiving": devices_cpu / gb}
        edged["central"] = edged["broker"] + edged["sending"]
    else:
        edged = dict.fromkeys(("broker", "sending", "receiving", "central"))
    out: dict[str, Any] = {"raw": {k: round(v, 3) for k, v in raw.items()},
                           "edged": {k: (round(v, 3) if v is not None else None) for k, v in edged.items()}}
    out["central_ratio"] = round(raw["central"] / edged["central"], 3) if edged["central"] else None
    out["receiving_ratio"] = round(raw["receiving"] / edged["receiving"], 3) if edged["receiving"] else None
    return out


def _size(path: Any) -> int | None:
    return path.stat().st_size if path.exists() else None


def rollout_outcome(observer: Any, registry: Any, waves: list[list[str]], faulty: set[str]) -> dict:
    """Where the rollout stopped, and which devices moved: the later waves must not have."""
    path = registry.workdir / "root" / "rollouts" / "wide.json"
    document = json.loads(path.read_text()) if path.exists() else {}
    started = {d for _t, d, _e in observer.device_events("update_started", "2")}
    failed = {d for _t, d, e in observer.events if e.get("kind") in
              ("update_failed", "update_refused", "update_rolled_back") and e.get("version") == "2"}
    later = set().union(*waves[2:]) if len(waves) > 2 else set()
    outcome = {"state": document.get("state"), "current_wave": document.get("current"),
               "reason": document.get("reason"),
               "waves": [len(w) for w in waves],
               "active_v2_per_wave": [sum(observer.active.get(d) == "2" for d in w) for w in waves],
               "started_per_wave": [len(started & set(w)) for w in waves],
               "failed": sorted(failed), "faulty": sorted(faulty),
               "state_failure_reported": sorted(d for d in faulty if d in observer.failure),
               "planned_as_predicted": [w.get("devices") for w in document.get("waves", [])] == waves,
               "later_waves_touched": sorted(started & later)}
    outcome["ok"] = (outcome["state"] == "halted" and failed == faulty and not outcome["later_waves_touched"])
    return outcome


def print_table(result: dict[str, Any]) -> None:
    s = result["scenario"]
    title = (f"{s['devices']} devices, {s['model_bytes'] / 1e6:.1f} MB model, {s['registries']} registr"
             f"{'y' if s['registries'] == 1 else 'ies'}, {s['processes']} processes"
             + (f", one serve killed at {s['kill_at']:.0%}" if s["kill_at"] else "")
             + (f", rollout {s['rollout']} with {len(s['faulty'])} faulty" if s["rollout"] else ""))
    b, cpu, c = result["bytes_per_device_over_model"], result["cpu"], result["cpu_per_gb"]
    rows = [
        ("devices up (connected / model loaded)", f"{result['devices_started']['connected']} / "
         f"{result['devices_started']['loaded']} in {result['devices_started']['seconds']} s"),
        ("new version active (retained state)", f"{result['active_v2']['state']} "
         f"(devices' own view {result['active_v2']['devices_own_view']}, "
         f"kept after probation {result['active_v2']['kept_after_probation']})"),
        ("time from release to all active", f"{result['converge_s']} s"),
        ("download window (release to last download)", f"{result['download_window_s']} s"),
        ("bytes per device / model size", f"mean {b['delivered_mean']}, max {b['delivered_max']} "
         f"(accepted {b['accepted_mean']}; the release with its self-test files: "
         f"{b['release_over_model']})"),
        ("aggregate download", f"{result['aggregate_mb_s']} MB/s"),
        ("raw broker, same bytes and chunks", f"{result['raw_mb_s']} MB/s "
         f"({result['raw']['seconds']:.1f} s)"),
        ("aggregate / raw, wall clock (target >= 0.50)", f"{result['aggregate_over_raw']}"),
        ("central CPU s/GB: raw (pub + broker)", f"{c['raw']['central']} ({c['raw']['sending']} + "
         f"{c['raw']['broker']})"),
        ("central CPU s/GB: edged (serve + broker)", f"{c['edged']['central']} ({c['edged']['sending']} + "
         f"{c['edged']['broker']})"),
        ("central raw / edged (target >= 0.50)", f"{result['central_ratio']}"),
        ("receiving CPU s/GB: raw subs, devices", f"{c['raw']['receiving']}, {c['edged']['receiving']} "
         f"(raw / devices {c['receiving_ratio']})"),
        ("registry CPU", f"{result['registry_cpu_s']} s, {result['registry_cpu_s_per_gb']} s/GB "
         f"({result['delivered_gb']} GB delivered)"),
        ("broker messages/s (all packets)", f"{result['broker']['messages_per_s']}"),
        ("broker PUBLISH/s in+out", f"{result['broker']['publish_per_s']}, "
         f"{result['broker']['mb_sent_per_s']} MB/s sent"),
        ("idle PUBLISH per device per minute", f"{result['idle']['publish_per_device_per_min']} "
         f"(retained on broker: {result['broker']['retained']:.0f})"),
        ("failures / refusals / rollbacks",
         f"{result['failures']} / {result['refusals']} / {result['rollbacks']}"),
        ("chunk retries / reconnects (devices)", f"{result['chunks_retried']} / {result['reconnects']}"),
        ("busy refusals (each serve)", f"{result['registry_busy']}"),
        ("CPU s: devices, registry, broker", f"{cpu['devices_s']}, {cpu['registry_s']}, {cpu['broker_s']} "
         f"({cpu['devices_s_per_update']} s per device update)"),
        ("peak RSS MiB: worker processes, serves", f"{result['memory_mib']['workers_peak_rss_mib']}, "
         f"{result['memory_mib']['serves_peak_rss_mib']}"),
        ("CPU s: whole machine, others", f"{cpu['machine_s']}, {cpu['others_s']} over {cpu['wall_s']} s"),
    ]
    if result["killed"]:
        k = result["killed"]
        rows.append(("serve SIGKILLed", f"at {k['at_s']:.1f} s, {k['accepted_bytes'] / 1e9:.2f} GB in"))
    if "rollout" in result:
        r = result["rollout"]
        rows += [("rollout", f"state {r['state']}, waves {r['waves']}, started per wave "
                  f"{r['started_per_wave']}, active per wave {r['active_v2_per_wave']}"),
                 ("failed devices (faulty)", f"{len(r['failed'])} ({len(r['faulty'])}), later waves touched: "
                  f"{len(r['later_waves_touched'])}")]
    print(title)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"  {'result':<{width}}  {'OK' if result['ok'] else 'NOT OK'}")
