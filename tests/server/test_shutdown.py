"""`ringlinear serve` as a real process: Ctrl-C (SIGINT) finishes in-flight streams, then exits with status 0."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_drains_and_exits_cleanly(tiny_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ringlinear", "serve", "--model", tiny_dir, "--port", str(port),
                             "--device", "cpu", "--threads", "1", "--max-num-seqs", "4", "--num-kv-blocks", "64",
                             "--prefill-chunk", "64", "--max-num-batched-tokens", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

        events, first = [], threading.Event()

        def stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 120, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGINT)
        t.join(60)
        assert not t.is_alive()
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in events[-2]  # the in-flight request ran to completion
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert "server stopped cleanly" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
