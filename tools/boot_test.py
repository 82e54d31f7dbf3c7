#!/usr/bin/env python3
"""Boot the .deb under a real systemd and check what docs/service.md promises.

    sudo .venv/bin/python tools/boot_test.py [--deb dist/edged_X_amd64.deb] [--keep-going]

Builds the .deb (tools/build_deb.sh, gzip) unless --deb names one, restores a cached
Debian bookworm rootfs (debootstrap'd once with systemd, dbus and the .deb's Depends,
kept as a zstd tarball under /var/cache/edged-boot-test/, keyed by the package list),
boots it with systemd-nspawn (systemd as PID 1), installs the package and prints one
line per check: PASS, FAIL or NOT CHECKABLE, and a detail. Needs root (CAP_SYS_ADMIN),
debootstrap, systemd-container and zstd. Not part of pytest or .ci/run: it takes minutes.
Exit status: 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot.checks import Checks
from boot.container import Container, depends_of, log, rootfs_tarball

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/edged-boot-test")
SAMPLES = Path.home() / ".cache/edged/samples"
SOCK = "/run/edged/edged.sock"
CURL = f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 60 --unix-socket {SOCK}"
TOML = "/etc/edged/edged.toml"
DEB_IN = "/srv/edged-boot/edged.deb"
INPUT = "/srv/edged-boot/input.npy"
# Writes a zeros tensor shaped as the model's first input (run by the package's python).
MAKE_INPUT = f"""
import numpy as np
from edged.api.tensors import DATATYPES
from edged.client import Client
with Client({SOCK!r}) as client:
    spec = client.metadata("face")["inputs"][0]
np.save({INPUT!r}, np.zeros([max(d, 1) for d in spec["shape"]], DATATYPES[spec["datatype"]]))
"""


def check_boot(c: Checks) -> bool:
    start = time.monotonic()
    while True:  # systemctl cannot connect until PID 1 has set up its private socket
        r = c.box.run("systemctl is-system-running --wait", timeout=180)
        if "Failed to connect" not in r.stdout or time.monotonic() - start > 60:
            break
        time.sleep(0.5)
    state = r.stdout.splitlines()[-1] if r.stdout else "?"
    target = c.box.out("systemctl is-active multi-user.target")
    detail = f"is-system-running={state} after {time.monotonic() - start:.0f} s, multi-user.target {target}"
    if state == "degraded":
        detail += "; failed units: " + c.box.out("systemctl --failed --plain --no-legend | cut -d' ' -f1")
    return c.check("boot", state in ("running", "degraded") and target == "active", detail)


def check_install(c: Checks) -> bool:
    start = time.monotonic()
    r = c.box.run(f"apt-get install -y --no-install-recommends {DEB_IN}", timeout=600)
    note = ""
    if r.returncode:  # a dependency the cached rootfs lacks: fetch it from the mirror
        note = " (needed apt-get update: the rootfs lacks a dependency)"
        r = c.box.run(f"apt-get update -q && apt-get install -y --no-install-recommends {DEB_IN}",
                      timeout=900)
    version = c.box.out("dpkg-query -W -f '${Version} ${db:Status-Abbrev}' edged")
    return c.check("install", r.returncode == 0 and "ii" in version,
                   f"apt-get install ./edged.deb exit {r.returncode} in {time.monotonic() - start:.0f} s, "
                   f"edged {version}{note}" + (f": {r.stdout[-300:]}" if r.returncode else ""))


def check_active(c: Checks) -> bool:
    out = c.box.out("systemctl is-active edged.socket edged.service").split()
    enabled = c.box.out("systemctl is-enabled edged.socket edged.service edged-registry.service").split()
    ok = out == ["active", "active"] and enabled == ["enabled", "enabled", "disabled"]
    return c.check("units active", ok,
                   f"edged.socket/edged.service {out}, is-enabled socket/service/registry {enabled}")


def check_ready(c: Checks) -> bool:
    code = c.box.out(f"{CURL} http://localhost/v2/health/ready")
    props = c.show("edged.service", "Type", "StatusText", "NotifyAccess")
    return c.check("readiness and STATUS=", code == "200" and bool(props.get("StatusText")),
                   f"GET /v2/health/ready -> {code}; Type={props.get('Type')}, "
                   f"StatusText={props.get('StatusText')!r}")


def check_inference(c: Checks) -> bool:
    c.box.run("install -d -m 0755 /srv/edged-boot && cp /root/face.tflite /srv/edged-boot/ "
              "&& chmod 0644 /srv/edged-boot/face.tflite", check=True)
    add = c.box.run("runuser -u edged -- edged models add face /srv/edged-boot/face.tflite --version 1 "
                    "--activate --store /var/lib/edged/models")
    ok, code, took = c.wait(f"{CURL} http://localhost/v2/models/face/ready", "200", 60)
    if not ok:
        return c.check("inference", False, f"models add exit {add.returncode} ({add.stdout[-200:]}); "
                       f"/v2/models/face/ready -> {code} after {took:.0f} s")
    made = c.box.run(f"/opt/edged/bin/python3 -c {shlex.quote(MAKE_INPUT)} && chmod 0644 {INPUT}")
    r = c.box.run(f"edged predict --socket {SOCK} --model face --input {INPUT}")
    status = c.show("edged.service", "StatusText")["StatusText"]
    return c.check("inference", made.returncode == 0 and r.returncode == 0 and r.stdout.startswith("face 1"),
                   f"model served {took:.0f} s after `models add`; predict exit {r.returncode}: "
                   f"{(made.stdout + ' ' + r.stdout)[:250]}; StatusText={status!r}")


def check_socket_activation(c: Checks) -> bool:
    c.box.run("systemctl stop edged.service")
    before = c.box.out("systemctl is-active edged.service edged.socket").split()
    start = time.monotonic()
    code = c.box.out(f"{CURL} http://localhost/v2/health/ready")
    took = time.monotonic() - start
    after = c.box.out("systemctl is-active edged.service")
    ok = before == ["inactive", "active"] and code == "200" and after == "active"
    return c.check("socket activation", ok,
                   f"service/socket after stop {before}; a connect got {code} in {took:.1f} s; "
                   f"service then {after}")


def check_watchdog(c: Checks) -> bool:
    props = c.show("edged.service", "MainPID", "NRestarts", "WatchdogUSec")
    pid, restarts = props["MainPID"], int(props["NRestarts"])
    cursor = c.cursor()
    c.box.run(f"kill -STOP {pid}")
    start = time.monotonic()
    new = props
    while time.monotonic() - start < 240:
        time.sleep(2)
        new = c.show("edged.service", "MainPID", "NRestarts", "ActiveState", "SubState")
        running = (new["ActiveState"], new["SubState"]) == ("active", "running")
        if int(new["NRestarts"]) > restarts and running:
            break
    took = time.monotonic() - start
    journal = c.journal_since(cursor, "-u edged")
    stacks = "most recent call first" in journal or "Thread 0x" in journal
    stacks = "faulthandler stacks in journal" if stacks else "no faulthandler stacks in journal"
    logged = "Watchdog timeout" in journal
    timeout_line = "'Watchdog timeout' logged" if logged else "no 'Watchdog timeout' line"
    return c.check("watchdog", int(new["NRestarts"]) > restarts and new["MainPID"] != pid,
                   f"SIGSTOP pid {pid} (WatchdogUSec={props['WatchdogUSec']}): NRestarts {restarts} -> "
                   f"{new['NRestarts']}, new pid {new['MainPID']} {new.get('SubState')} after {took:.0f} s; "
                   f"{timeout_line}; {stacks}")


def check_journal_fields(c: Checks) -> bool:
    lines = c.box.out("journalctl -q --no-pager -o cat -u edged MODEL=face").splitlines()
    return c.check("journald fields", bool(lines),
                   f"journalctl -u edged MODEL=face: {len(lines)} lines"
                   + (f", e.g. {lines[-1]!r}" if lines else ""))


def check_reload(c: Checks) -> None:
    """A change that applies at once, one that needs a restart, then a config that does not load."""
    pid = c.show("edged.service", "MainPID")["MainPID"]
    c.box.run("cp /etc/edged/edged.toml /root/edged.toml.orig", check=True)
    steps = (("[logging]\\nlevel = \"debug\"\\n[store]\\npoll_interval_s = 2.0", "config reloaded"),
             ("[store", "config not reloaded"))
    details, ok = [], True
    for change, expect in steps:
        cursor = c.cursor()
        c.box.run(f"cp /root/edged.toml.orig {TOML} && printf '{change}\\n' >> {TOML}")
        r = c.box.run("systemctl reload edged")
        line, start = "", time.monotonic()
        while not line and time.monotonic() - start < 15:  # systemd 252: the reload ends after systemctl
            time.sleep(0.5)
            line = next((x for x in c.journal_since(cursor, "-u edged").splitlines() if expect in x), "")
        status = c.show("edged.service", "StatusText")["StatusText"]
        ok = ok and r.returncode == 0 and bool(line)
        line = line or f"has no {expect!r} line"
        details.append(f"exit {r.returncode}, journal {line!r}, StatusText {status!r}")
    needs = "restart needed for: store" in details[0]
    c.box.run("cp /root/edged.toml.orig /etc/edged/edged.toml && systemctl reload edged")
    after, start = c.show("edged.service", "MainPID", "ActiveState"), time.monotonic()
    while after["ActiveState"] == "reloading" and time.monotonic() - start < 15:  # as above: ends later
        time.sleep(0.5)
        after = c.show("edged.service", "MainPID", "ActiveState")
    ok = ok and needs and after["MainPID"] == pid and after["ActiveState"] == "active"
    c.check("reload", ok, f"pid {pid} -> {after['MainPID']} {after['ActiveState']}; "
            f"[logging]+[store] changed: {details[0]}; broken toml: {details[1]}")


def check_files(c: Checks) -> None:
    paths = ("/usr/bin/edged /usr/bin/edged-registry /etc/edged/edged.toml /usr/share/doc/edged/service.md "
             "/usr/share/doc/edged/README.md /usr/share/doc/edged/configuration.md.gz")
    missing = c.box.out(f"for p in {paths}; do [ -e $p ] || echo $p; done").split()
    pyc = c.box.out("find /opt/edged/lib -name '*.pyc' | wc -l")
    groups = c.box.out("id -nG edged")
    registry = c.box.out("id -nG edged-registry")
    c.check("installed files and users", not missing and int(pyc or 0) > 0 and "video" in groups.split(),
            f"missing: {missing or 'nothing'}; {pyc} .pyc compiled at install; edged in groups [{groups}], "
            f"edged-registry in [{registry}]")


def check_run_check(c: Checks) -> None:
    r = c.box.run("runuser -u edged -- env STATE_DIRECTORY=/var/lib/edged CACHE_DIRECTORY=/var/cache/edged "
                  "edged run --check", timeout=300)
    c.check("edged run --check", r.returncode == 0, f"exit {r.returncode}: {r.stdout[-250:]}")


def check_restart_socket(c: Checks) -> bool:
    inode = c.box.out(f"stat -c %i {SOCK}")
    pid = c.show("edged.service", "MainPID")["MainPID"]
    # A client connecting during the restart waits in the backlog and is answered by the new daemon.
    r = c.box.run(f"systemctl restart --no-block edged; sleep 0.2; {CURL} http://localhost/v2/models/face/ready")
    after = c.box.out(f"stat -c %i {SOCK}")
    # The curl may be answered by the old daemon before systemd's stop reaches it (a busy PID 1 in the
    # container): wait for the restart to finish before judging the new pid, as check_reload does.
    props, start = c.show("edged.service", "MainPID", "ActiveState"), time.monotonic()
    while (props["MainPID"] == pid or props["ActiveState"] != "active") and time.monotonic() - start < 30:
        time.sleep(0.5)
        props = c.show("edged.service", "MainPID", "ActiveState")
    return c.check("restart keeps the socket",
                   inode == after and props["MainPID"] != pid and r.stdout == "200",
                   f"inode {inode} -> {after}, pid {pid} -> {props['MainPID']} {props['ActiveState']}, "
                   f"face ready asked during the restart -> {r.stdout}")


def check_clean_stop(c: Checks) -> bool:
    cursor = c.cursor()
    start = time.monotonic()
    r = c.box.run("systemctl stop edged.service")
    took = time.monotonic() - start
    props = c.show("edged.service", "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    socket = c.box.out("systemctl is-active edged.socket")
    errors = [line for line in c.journal_since(cursor, "-u edged -p warning").splitlines()]
    c.box.run("systemctl start edged.service")
    ok = r.returncode == 0 and props["Result"] == "success" and props["ExecMainStatus"] == "0"
    return c.check("clean stop", ok and socket == "active",
                   f"stop took {took:.1f} s, Result={props['Result']} ExecMainCode={props['ExecMainCode']} "
                   f"ExecMainStatus={props['ExecMainStatus']}, socket {socket}; "
                   f"warnings: {errors[-1] if errors else 'none'}")


def check_security(c: Checks) -> None:
    out = c.box.out("systemd-analyze security --no-pager edged.service").splitlines()
    level = out[-1] if out else ""
    found = re.search(r"(\d+\.\d+) (\S+)", level)
    registry = c.box.out("systemd-analyze security --no-pager edged-registry.service | tail -1")
    c.check("systemd-analyze security", bool(found) and float(found.group(1)) <= 1.5,
            f"{level.strip()} (docs promise 1.5 OK); registry: {registry.strip()} (docs: 1.1)")
    pid = c.show("edged.service", "MainPID")["MainPID"]
    lines = c.box.out(f"cat /proc/{pid}/status").splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    got = {k: status.get(k, "?").strip() for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "CapPrm")}
    ok = got["NoNewPrivs"] == "1" and got["Seccomp"] == "2" and all(
        set(got[k]) == {"0"} for k in ("CapEff", "CapBnd", "CapPrm"))
    user = c.box.out(f"ps -o user=,group= -p {pid}")
    c.check("privileges of the main process", ok and user.split() == ["edged", "edged"],
            f"pid {pid} runs as {user}: " + ", ".join(f"{k}={v}" for k, v in got.items()))


def check_sandbox_writes(c: Checks) -> bool:
    """Writes as edged in the daemon's own mount namespace (ProtectSystem=strict & co)."""
    pid = c.show("edged.service", "MainPID")["MainPID"]
    enter = f"nsenter -t {pid} -m -S $(id -u edged) -G $(id -g edged) --"
    results = {}
    for path in ("/var/lib/edged", "/var/lib/edged/models", "/var/cache/edged", "/run/edged/run",
                 "/opt/edged", "/etc/edged", "/home"):
        probe = f"{path}/.boot-test-probe"
        r = c.box.run(f"{enter} sh -c 'touch {probe} && rm {probe}'")
        results[path] = r.returncode == 0
    want = {p: p.startswith(("/var/lib/edged", "/var/cache/edged", "/run/edged/run")) for p in results}
    contents = c.box.out("ls -A /var/lib/edged | tr '\\n' ' '")
    return c.check("sandbox writes", results == want,
                   "writable: " + ", ".join(p for p, w in results.items() if w)
                   + "; not writable: " + ", ".join(p for p, w in results.items() if not w)
                   + f"; /var/lib/edged holds: {contents}")


def check_group_access(c: Checks) -> bool:
    c.box.run("useradd -M outsider; useradd -M -G edged insider")
    outside = c.box.run(f"runuser -u outsider -- {CURL} http://localhost/v2/health/ready")
    inside = c.box.run(f"runuser -u insider -- {CURL} http://localhost/v2/health/ready")
    mode = c.box.out(f"stat -c '%U:%G %a' {SOCK}")
    return c.check("group-only socket access",
                   outside.returncode != 0 and inside.stdout == "200" and mode == "root:edged 660",
                   f"socket {mode}; outsider curl exit {outside.returncode} ({outside.stdout}), "
                   f"insider (group edged) -> {inside.stdout}")


def check_upgrade(c: Checks) -> bool:
    """dpkg -i over the installed package runs the upgrade path of the maintainer scripts
    (postinst configure <old version>): the daemon restarts, the socket unit must not."""
    socket_before = c.show("edged.socket", "ActiveEnterTimestampMonotonic", "InvocationID")
    inode = c.box.out(f"stat -c %i {SOCK}")
    pid = c.show("edged.service", "MainPID")["MainPID"]
    # Clients asking all through the upgrade: none may be refused.
    asking = (f"for i in $(seq 1 400); do {CURL} http://localhost/v2/models/face/ready; echo; "
              "[ -e /tmp/upgraded ] && break; sleep 0.05; done")
    r = c.box.run(f"rm -f /tmp/upgraded; ({asking}) > /tmp/codes & "
                  f"dpkg -i {DEB_IN} >/tmp/dpkg.log 2>&1; echo $? > /tmp/upgraded; wait; cat /tmp/upgraded",
                  timeout=600)
    codes = c.box.out("cat /tmp/codes").split()
    ok, _, took = c.wait(f"{CURL} http://localhost/v2/models/face/ready", "200", 90)
    socket_after = c.show("edged.socket", "ActiveEnterTimestampMonotonic", "InvocationID")
    after = c.show("edged.service", "MainPID", "ActiveState")
    refused = [x for x in codes if x != "200"]
    return c.check("upgrade keeps the socket",
                   r.stdout.strip() == "0" and socket_after == socket_before and ok
                   and inode == c.box.out(f"stat -c %i {SOCK}") and after["MainPID"] != pid and not refused,
                   f"dpkg -i exit {r.stdout.strip()}; socket unit entered active at "
                   f"{socket_before['ActiveEnterTimestampMonotonic']} -> "
                   f"{socket_after['ActiveEnterTimestampMonotonic']}; daemon pid {pid} -> {after['MainPID']} "
                   f"{after['ActiveState']}; {len(codes)} requests during the upgrade, "
                   f"not 200: {refused or 'none'}; face ready {took:.0f} s after")


def check_remove_purge(c: Checks) -> None:
    exists = "for p in {}; do [ -e $p ] && echo $p; done"
    paths = "/opt/edged /usr/bin/edged /etc/edged/edged.toml /var/lib/edged/models/face /var/cache/edged " \
            "/lib/systemd/system/edged.service /run/edged/edged.sock"
    users = "getent passwd edged edged-registry | cut -d: -f1 | tr '\\n' ' '"
    r = c.box.run("apt-get remove -y edged", timeout=300)
    left = c.box.out(exists.format(paths)).split()
    active = c.box.out("systemctl is-active edged.service edged.socket").split()
    gone = {"/opt/edged", "/usr/bin/edged", "/lib/systemd/system/edged.service"}
    kept = {"/etc/edged/edged.toml", "/var/lib/edged/models/face"}
    ok = not gone & set(left) and kept <= set(left) and "active" not in active
    c.check("apt remove", r.returncode == 0 and ok,
            f"exit {r.returncode}; left: {left}; units {active}; users: {c.box.out(users)}")
    r = c.box.run(f"apt-get install -y --no-install-recommends {DEB_IN}", timeout=600)
    ok, code, took = c.wait(f"{CURL} http://localhost/v2/models/face/ready", "200", 90)
    active = c.box.out("systemctl is-active edged.socket edged.service").split()
    c.check("reinstall", r.returncode == 0 and ok and active == ["active", "active"],
            f"exit {r.returncode}; units {active}; kept model face ready -> {code} after {took:.0f} s")
    r = c.box.run("apt-get purge -y edged", timeout=300)
    left = c.box.out(exists.format(paths + " /etc/edged /var/lib/edged /run/edged")).split()
    kept = c.box.out(users).split()
    c.check("apt purge", r.returncode == 0 and not left and kept == ["edged", "edged-registry"],
            f"exit {r.returncode}; left: {left or 'nothing'}; users kept: {kept}")


def run_checks(c: Checks, sample: Path) -> bool:
    """Every check after the boot and the install; False when those failed."""
    if not (check_boot(c) and check_install(c)):
        log("console: " + c.box.console.read_text(errors="replace")[-2000:])
        return False
    for step in (check_active, check_files, check_ready, check_inference, check_socket_activation,
                 check_watchdog, check_journal_fields, check_reload, check_restart_socket, check_clean_stop,
                 check_security, check_sandbox_writes, check_group_access, check_run_check,
                 check_upgrade):
        if step is check_inference and not sample.exists():
            c.report("NOT CHECKABLE", "inference", f"no sample model at {sample} (tools/fetch_models.py)")
            continue
        try:
            step(c)
        except Exception as exc:  # one broken check must not hide the others
            c.report("FAIL", step.__name__.removeprefix("check_"), f"{type(exc).__name__}: {exc}")
    controllers = c.box.out("cat /sys/fs/cgroup/cgroup.controllers") or "none"
    c.report("NOT CHECKABLE", "MemoryMax=/CPUQuota=",
             "the host's cgroup has no controllers to delegate "
             f"(container's cgroup.controllers: {controllers})")
    return True


def build_deb() -> Path:
    for attempt in (1, 2, 3):
        r = subprocess.run([str(REPO / "tools/build_deb.sh"), tempfile.mkdtemp(prefix="edged-boot-dist.")],
                           env=dict(os.environ, DEB_COMPRESSION="gzip"), capture_output=True, text=True)
        if r.returncode == 0:
            return Path(r.stdout.strip().splitlines()[-1])
        log(f"build_deb.sh failed (attempt {attempt}): {r.stderr[-800:]}")
        time.sleep(60)  # the packaging may be mid-change: wait and retry
    raise SystemExit("boot_test: tools/build_deb.sh keeps failing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="test this .deb instead of building one")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"rootfs cache (default {CACHE})")
    args = parser.parse_args()
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up
    deb = args.deb.resolve() if args.deb else build_deb()
    built_deb = None if args.deb else deb.parent
    t_deb = time.monotonic() - t0
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    tarball, built = rootfs_tarball(args.cache, depends_of(deb), arch)
    t_rootfs = time.monotonic() - t0 - t_deb
    box = Container(tarball, Path(tempfile.mkdtemp(prefix="edged-boot.")))
    checks = Checks(box)
    try:
        box.unpack()
        (box.root / "srv/edged-boot").mkdir(parents=True)
        subprocess.run(["cp", str(deb), str(box.root / DEB_IN.lstrip("/"))], check=True)
        sample = SAMPLES / "face_detection_short_range.tflite"
        if sample.exists():
            subprocess.run(["cp", str(sample), str(box.root / "root/face.tflite")], check=True)
        t_boot = time.monotonic()
        box.boot()
        if run_checks(checks, sample):
            check_remove_purge(checks)
        t_checks = time.monotonic() - t_boot
        log(f"stopping the container: {box.stop()}")
    finally:
        box.cleanup()
        shutil.rmtree(box.root.parent, ignore_errors=True)
        if built_deb:
            shutil.rmtree(built_deb, ignore_errors=True)
    wall = time.monotonic() - t0
    counts = checks.counts
    kind = "cold: rootfs built" if built else "warm: cached rootfs"
    print(f"wall {wall:.0f} s ({kind}): .deb {t_deb:.0f} s, "
          f"rootfs {t_rootfs:.0f} s, boot+checks {t_checks:.0f} s; {counts['PASS']} passed, "
          f"{counts['FAIL']} failed, {counts['NOT CHECKABLE']} not checkable", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
