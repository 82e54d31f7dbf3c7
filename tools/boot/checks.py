"""The check recorder of tools/boot_test.py and its helpers over the container."""

from __future__ import annotations

import shlex
import time

from boot.container import Container


class Checks:
    def __init__(self, box: Container) -> None:
        self.box = box
        self.counts = {"PASS": 0, "FAIL": 0, "NOT CHECKABLE": 0}

    def report(self, status: str, name: str, detail: str) -> None:
        self.counts[status] += 1
        detail = " ".join(detail.split())
        print(f"{status:<13} {name}: {detail[:700]}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.report("PASS" if ok else "FAIL", name, detail)
        return ok

    # Helpers over the container.
    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.box.out(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, command: str, want: str, timeout: float) -> tuple[bool, str, float]:
        """Runs command until its output is want; (ok, last output, seconds)."""
        start = time.monotonic()
        while True:
            out = self.box.out(command)
            if out == want or time.monotonic() - start > timeout:
                return out == want, out, time.monotonic() - start
            time.sleep(0.5)

    def journal_since(self, cursor: str, *filters: str) -> str:
        return self.box.out(f"journalctl -q --no-pager -o cat --after-cursor={shlex.quote(cursor)} "
                            + " ".join(filters))

    def cursor(self) -> str:
        out = self.box.out("journalctl -q -n 0 --show-cursor --no-pager")
        return out.rsplit("cursor: ", 1)[-1].strip()
