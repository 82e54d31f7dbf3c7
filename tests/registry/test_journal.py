"""`edged-registry serve` under systemd logs as the daemon does: journal entries with fields,
no time of their own (the journal keeps it), nothing on stderr.

No journald runs in the test container, so the test stands in for it with a real datagram
socket at journald's own path, /run/systemd/journal/socket, in a mount namespace of the
test's own (a tmpfs over /run/systemd that nothing else on the machine sees), and gives
the registry a stderr that JOURNAL_STREAM names, as systemd does. libsystemd then sends
the entries to that socket in journald's native protocol, which the test reads back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="mounts a tmpfs in a mount namespace: needs root and unshare")

ROOT = Path(__file__).resolve().parents[2]

# Runs inside `unshare --mount`: journald's socket, then `serve` until it is online, then SIGTERM.
STAND_IN = r'''
import json, os, signal, socket, subprocess, sys
from pathlib import Path
config, stderr_path, root = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, root)
from tests.daemon_process import ChildProcess, wait_until
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], check=True)
os.mkdir("/run/systemd/journal")
journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
journal.bind("/run/systemd/journal/socket")
journal.settimeout(0.2)

def parse(data):
    """journald's native protocol: KEY=value lines, or KEY, a 64-bit length and the bytes."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:
            size = int.from_bytes(data[end + 1:end + 9], "little")
            key, value = line, data[end + 9:end + 9 + size]
            i = end + 9 + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields

entries = []
def logged(text):
    """True once an entry starting with `text` arrived; else reads one more (waiting 0.2 s at most)."""
    if any(e.get("MESSAGE", "").startswith(text) for e in entries):
        return True
    try:
        entries.append(parse(journal.recv(65536)))
    except TimeoutError:
        pass
    return False

def awaited(text):
    return lambda: f"an entry {text!r}; entries: {[e.get('MESSAGE') for e in entries]}"

stderr_path.touch()  # ChildProcess truncates it: the same inode stays serve's stderr
st = os.stat(stderr_path)
env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
with ChildProcess([sys.executable, "-m", "edged.registry", "serve", "--config", config], stderr_path,
                  name="serve", env=env) as serve:
    wait_until(lambda: logged("online:"), 30, awaited("online:"), interval=0)
    # Keep reading while it stops, as journald does: a unix datagram socket holds only
    # max_dgram_qlen (10) entries, and a logger writing to a full one blocks.
    serve.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: logged("stopped:"), 30, awaited("stopped:"), interval=0)
    returncode = serve.proc.wait(30)  # no second SIGTERM: it restored the default handler on its way out
print(json.dumps({"returncode": returncode, "entries": entries}))
'''


def test_serve_under_systemd_logs_journal_entries_without_a_time_of_their_own(registry, tmp_path):
    stderr = tmp_path / "stderr"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", STAND_IN,
                           str(registry.config), str(stderr), str(ROOT)],
                          capture_output=True, text=True, env=registry.env, cwd=registry.workdir, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["returncode"] == 0, stderr.read_text()
    entries = result["entries"]
    messages = [entry["MESSAGE"] for entry in entries]
    online = next(e for e in entries if e["MESSAGE"].startswith("online: answering chunk requests"))
    assert online["SYSLOG_IDENTIFIER"] == "edged-registry" and online["PRIORITY"] == "6"
    assert online["LOGGER"].startswith("edged.registry")
    assert any(message.startswith("stopped: served 0 chunks") for message in messages), messages
    # The journal stamps each entry; a time in the message itself is the second one the boot test saw.
    assert not [m for m in messages if re.match(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d", m)], messages
    assert "online:" not in stderr.read_text()  # the entries went to the journal, not to stderr
