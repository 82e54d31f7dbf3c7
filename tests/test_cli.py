"""The `edged` command as a user runs it: store management, predict, run and its refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from edged.client import ClientError
from tests.conftest import build_tiny_ir, ir_files
from tests.daemon_process import wait_until

X = np.array([[1, 2, -3, 0.5]], np.float32)


CACHE = tempfile.mkdtemp(prefix="edged-test-cache-")


def edged(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would; the OpenVINO cache stays out of /var/cache."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    full_env.update({"EDGED_BACKENDS__OPENVINO_CACHE_DIR": CACHE, **(env or {})})
    result = subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                            timeout=120, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"edged {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def test_models_add_list_activate_rollback_remove(tmp_path, tiny_ir):
    store = str(tmp_path / "store")
    out = edged("models", "add", "tiny", *map(str, ir_files(tiny_ir)), "--version", "1", "--store", store)
    assert out.stdout.strip() == "added tiny 1 (openvino), active"
    v2 = build_tiny_ir(tmp_path / "v2", scale=3.0)
    out = edged("models", "add", "tiny", *map(str, ir_files(v2)), "--version", "2", "--store", store)
    assert out.stdout.strip() == "added tiny 2 (openvino)"
    assert edged("models", "list", "--store", store).stdout.strip() == "tiny: 1*, 2"
    edged("models", "activate", "tiny", "2", "--store", store)
    assert edged("models", "list", "--store", store).stdout.strip() == "tiny: 1, 2*"
    refused = edged("models", "remove", "tiny", "2", "--store", store, check=False)
    assert refused.returncode == 1 and "is active" in refused.stderr
    assert "rolled back to 1" in edged("models", "rollback", "tiny", "--store", store).stdout
    edged("models", "remove", "tiny", "2", "--store", store)
    assert edged("models", "list", "--store", store).stdout.strip() == "tiny: 1*"
    bad = edged("models", "add", "../evil", str(tiny_ir), "--version", "1", "--store", store, check=False)
    assert bad.returncode == 1 and "invalid model name" in bad.stderr
    dup = edged("models", "add", "tiny", *map(str, ir_files(tiny_ir)), "--version", "1", "--store", store,
                check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr


def test_invalid_config_names_the_field(tmp_path):
    config = tmp_path / "edged.toml"
    config.write_text("[socket]\nmax_connections = -1\n")
    result = edged("run", "--config", str(config), check=False)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "socket.max_connections" in line
    config.write_text("[socket\n")
    result = edged("run", "--config", str(config), check=False)
    assert result.returncode == 2 and "invalid TOML" in result.stderr
    config.write_text("[sockets]\npath = 'x'\n")
    result = edged("run", "--config", str(config), check=False)
    assert result.returncode == 2 and "sockets: Extra inputs are not permitted" in result.stderr


def test_run_check_validates_models(sample_store, tmp_path):
    result = edged("run", "--check", "--store", str(sample_store.root))
    assert "face: ready: 1 on" in result.stdout and "selfie: ready: 1 on litert" in result.stdout
    (sample_store.version_dir("tiny", "1") / "tiny.bin").write_bytes(b"\0" * 16)
    result = edged("run", "--check", "--store", str(sample_store.root), check=False)
    assert result.returncode == 1 and "tiny: failed: tiny 1: tiny.bin is 16 bytes" in result.stdout


def test_predict_npy_image_and_json(start_daemon, sample_store, tmp_path):
    import cv2

    daemon = start_daemon(sample_store.root)
    npy = tmp_path / "x.npy"
    np.save(npy, X)
    out = edged("predict", "--socket", str(daemon.socket), "--model", "tiny", "--input", str(npy))
    assert out.stdout.splitlines() == ["tiny 1", "  y float32 [1, 4] min 0 max 5 mean 2.5"]
    out = edged("predict", "--socket", str(daemon.socket), "--model", "tiny", "--input", str(npy), "--json")
    doc = json.loads(out.stdout)
    assert doc["outputs"][0]["data"] == [3, 5, 0, 2]
    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.full((480, 640, 3), 128, np.uint8))
    out = edged("predict", "--socket", str(daemon.socket), "--model", "face", "--input", str(image))
    assert out.stdout.splitlines() == ["face 1"]  # a grey picture: no face
    out = edged("predict", "--socket", str(daemon.socket), "--model", "face", "--input", str(image), "--json")
    assert json.loads(out.stdout) == {"model": "face", "version": "1", "detections": []}
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    result = edged("predict", "--socket", str(daemon.socket), "--model", "face", "--input", str(bad),
                   check=False)
    assert result.returncode == 1 and "not a readable image" in result.stderr
    result = edged("predict", "--socket", str(daemon.socket), "--model", "nosuch", "--input", str(npy),
                   check=False)
    assert result.returncode == 1 and "HTTP 404" in result.stderr
    status = edged("status", "--socket", str(daemon.socket)).stdout
    assert "selfie" in status and "litert" in status


def test_hot_swap_under_load_fails_no_request(start_daemon, sample_store, tmp_path):
    daemon = start_daemon(sample_store.root)
    v2 = build_tiny_ir(tmp_path / "v2", scale=3.0)
    store = str(sample_store.root)
    edged("models", "add", "tiny", *map(str, ir_files(v2)), "--version", "2", "--store", store)
    failures: list[Exception] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with daemon.client() as client:
            while not stop.is_set():
                try:
                    doc, out = client.infer_full("tiny", {"x": X})
                    versions.append(doc["model_version"])
                    expected = {"1": [[3, 5, 0, 2]], "2": [[4, 7, 0, 2.5]]}[doc["model_version"]]
                    np.testing.assert_array_equal(out["y"], expected)
                except Exception as exc:
                    failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    edged("models", "activate", "tiny", "2", "--store", str(sample_store.root))
    wait_until(lambda: versions and versions[-1] == "2", 15, "answers from version 2")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert versions[0] == "1" and versions[-1] == "2"
    assert len(versions) > 100


def test_stale_socket_is_replaced(start_daemon, sample_store, short_dir):
    path = short_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    daemon = start_daemon(sample_store.root, config={"socket": {"path": str(path)}})
    with daemon.client() as client:
        assert client.ready()


def test_refuses_a_non_socket_file_and_a_live_socket(start_daemon, sample_store, tmp_path):
    daemon = start_daemon(sample_store.root)
    config = tmp_path / "edged.toml"
    config.write_text(f"[socket]\npath = '{daemon.socket}'\n[store]\npath = '{sample_store.root}'\n")
    result = edged("run", "--config", str(config), check=False)
    assert result.returncode == 1 and "another process is serving on" in result.stderr
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    config.write_text(f"[socket]\npath = '{plain}'\n[store]\npath = '{sample_store.root}'\n")
    result = edged("run", "--config", str(config), check=False)
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    assert plain.read_text() == "keep me"
    with daemon.client() as client:  # the first daemon is untouched
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)


def test_environment_overrides_the_file(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, env={"EDGED_MODELS__FACE__BACKEND": "litert"})
    with daemon.client() as client:
        assert client.metadata("face")["platform"] == "litert"


def test_unknown_model_version_route(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root)
    with daemon.client() as client, pytest.raises(ClientError) as info:
        client.infer("tiny", {"x": X}, version="5")
    assert info.value.status == 404


def test_models_list_names_an_unreadable_pointer_and_lists_the_rest(tmp_path, tiny_ir):
    store = str(tmp_path / "store")
    for name in ("alpha", "beta", "gamma"):
        edged("models", "add", name, *map(str, ir_files(tiny_ir)), "--version", "1", "--store", store)
    (tmp_path / "store" / "alpha" / ".active.json").write_text("{not json")
    out = edged("models", "list", "--store", store, check=False)
    lines = out.stdout.splitlines()
    assert out.returncode == 1
    assert lines[0].startswith("alpha: 1  (active version unknown: ")
    assert "unreadable active pointer" in lines[0]
    assert lines[1:] == ["beta: 1*", "gamma: 1*"]


def test_client_commands_ignore_the_daemons_cross_section_rules(tmp_path, tiny_ir):
    """Update settings without MQTT are the daemon's problem; `models list` still works."""
    store = str(tmp_path / "store")
    env = {"EDGED_UPDATES__ENABLED": "true"}
    edged("models", "add", "tiny", *map(str, ir_files(tiny_ir)), "--version", "1", "--store", store, env=env)
    assert edged("models", "list", "--store", store, env=env).stdout.strip() == "tiny: 1*"
    refused = edged("run", "--check", "--store", store, env=env, check=False)
    assert refused.returncode == 2
    assert "updates.enabled needs mqtt.enabled" in refused.stderr


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    store = tmp_path / "store"
    for n in range(1500):  # 1,500 lines of 64 bytes: more than a pipe holds, so the writer sees it close
        (store / f"m{n:04d}{'x' * 54}" / "1").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    lister = subprocess.Popen([sys.executable, "-m", "edged", "models", "list", "--store", str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.run(["head", "-1"], stdin=lister.stdout, capture_output=True, text=True, timeout=60)
    lister.stdout.close()
    assert head.stdout == f"m0000{'x' * 54}: 1\n"
    _, stderr = lister.communicate(timeout=60)
    assert lister.returncode == 141  # as a shell reports `ls | head -1`
    assert stderr == b""


def test_predict_annotate_draws_what_the_decoder_found(start_daemon, sample_store, tmp_path):
    import cv2
    import skimage.data

    daemon = start_daemon(sample_store.root)
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    original = cv2.imread(str(photo))
    predict = ("predict", "--socket", str(daemon.socket), "--input", str(photo))
    for model, out in (("face", tmp_path / "faces.jpg"), ("selfie", tmp_path / "person.png")):
        printed = edged(*predict, "--model", model, "--annotate", str(out)).stdout
        assert printed.startswith(f"{model} 1\n")  # the results are printed as without --annotate
        picture = cv2.imread(str(out))
        assert picture is not None and picture.shape == original.shape
        changed = (np.abs(picture.astype(int) - original).max(axis=2) > 60).mean()
        # A face's box and keypoints touch a few percent of the picture; the mask over the
        # person (more than half of it) changes most of it.
        assert (0.002 < changed < 0.05) if model == "face" else changed > 0.3, (model, changed)
    npy = tmp_path / "x.npy"
    np.save(npy, X)
    refused = edged("predict", "--socket", str(daemon.socket), "--model", "tiny", "--input", str(npy),
                    "--annotate", str(tmp_path / "x.jpg"), check=False)
    assert refused.returncode == 2 and "--input must be an image" in refused.stderr
    refused = edged(*predict, "--model", "face", "--annotate", str(tmp_path / "x.gif"), check=False)
    assert refused.returncode == 2 and "name a .jpg, .jpeg, .png file" in refused.stderr
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path / "x.gif").exists()
