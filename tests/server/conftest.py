"""A live server on loopback (uvicorn on its own thread, a port the OS picked), the tiny checkpoint on CPU."""
import importlib.util
import socket
import threading
import time

import pytest
import torch

from ringlinear.testing import make_tiny_checkpoint

# The serving extras are optional (the GPU box has no fastapi): without them these tests are not collected.
if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx", "openai")):
    collect_ignore_glob = ["test_*.py"]

API_KEY = "test-key"
MODEL = "tiny"


class LiveServer:
    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("server") / MODEL))


@pytest.fixture(scope="session")
def start_server(tiny_dir):
    """start_server(**engine_config) -> a LiveServer over the tiny checkpoint on CPU (stop it with .stop()), its
    AsyncEngine as .engine."""
    from ringlinear.engine import EngineConfig, LLMEngine
    from ringlinear.engine.async_engine import AsyncEngine
    from ringlinear.server.app import create_app

    def start(**kw):
        engine = AsyncEngine(LLMEngine(tiny_dir, EngineConfig(device="cpu", **kw)))
        live = LiveServer(create_app(engine, MODEL, api_key=API_KEY))
        live.engine = engine
        return live
    return start


@pytest.fixture(scope="session")
def server(start_server):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # 32 slots for 64 load-test clients (so requests queue) and 160 x 16 KV tokens (so they also preempt).
    live = start_server(max_num_seqs=32, num_kv_blocks=160, block_size=16, prefill_chunk=64,
                        max_num_batched_tokens=256, max_model_len=512)
    yield live
    live.stop()
    torch.set_num_threads(threads)


@pytest.fixture
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def wait_all_free(server):
    """wait_all_free(timeout) polls /stats until nothing is in flight and every KV block and state slot is free;
    returns (all_free, last stats)."""
    import httpx

    def wait(timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            s = httpx.get(server.url + "/stats", timeout=10).json()
            free = (s["in_flight"] == 0 and s["running"] == 0 and s["waiting"] == 0
                    and s["free_kv_blocks"] == s["total_kv_blocks"]
                    and s["free_state_slots"] == s["total_state_slots"])
            if free or time.monotonic() > deadline:
                return free, s
            time.sleep(0.05)
    return wait
