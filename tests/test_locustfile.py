"""benchmarks/locustfile.py against a stand-in server on loopback: with WARMPOOL_API_KEY set, every request it
sends carries that key as a bearer token (a server with keys refuses anything else). Bounded: one user for two
seconds, against a server that takes 50 ms per answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent.parent / "benchmarks" / "locustfile.py"


def test_the_locustfile_sends_the_api_key_as_a_bearer_token(tmp_path: Path):
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.headers.get("authorization"))
            time.sleep(0.05)
            body = json.dumps({"status": "succeeded"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "WARMPOOL_API_KEY": "bench-key", "WARMPOOL_MIX": "hello"}
        env.pop("WARMPOOL_BENCH_RAM", None)
        run = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-r", "1",
                              "-t", "2s", "--host", f"http://127.0.0.1:{server.server_address[1]}", "--only-summary"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert run.returncode == 0, run.stderr[-2000:]
    assert seen and set(seen) == {"Bearer bench-key"}, seen[:5]
