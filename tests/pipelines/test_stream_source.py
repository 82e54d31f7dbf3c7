"""An MJPEG stream over HTTP, served by the test on loopback, stopped and restarted
as a camera that is unplugged and plugged back in."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from edged.config import SourceSettings
from edged.pipelines.sources.camera import CameraSource
from tests.daemon_process import wait_until


class MjpegServer:
    def __init__(self, port: int = 0) -> None:
        self.streaming = threading.Event()
        self.streaming.set()
        streaming = self.streaming

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                index = 0
                try:
                    while streaming.is_set():
                        image = np.full((120, 160, 3), (index * 9) % 250, np.uint8)
                        jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        index += 1
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.streaming.clear()
        self.server.shutdown()
        self.server.server_close()


def test_a_stream_that_goes_away_is_reopened_when_it_returns():
    server = MjpegServer()
    url = f"http://127.0.0.1:{server.port}/stream.mjpg"
    source = CameraSource(SourceSettings(uri=url, reopen_backoff_s=0.2, read_timeout_s=2))
    source.start()
    try:
        wait_until(lambda: source.frames.received >= 10)
        assert source.state == "running"
        server.stop()  # the camera is unplugged
        wait_until(lambda: source.state == "reconnecting")
        assert source.last_error
        before = source.frames.received
        server = MjpegServer(server.port)  # and plugged back in
        wait_until(lambda: source.frames.received >= before + 10)
        assert source.state == "running" and source.reconnects >= 1
        frame = source.take(timeout=2)
        assert frame is not None and frame.image.shape == (120, 160, 3)
    finally:
        source.stop()
        server.stop()
