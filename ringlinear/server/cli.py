"""`ringlinear serve --model DIR`: the OpenAI-compatible server. fastapi/uvicorn are imported only when it runs."""
from __future__ import annotations

import logging
import os
import re
import socket

log = logging.getLogger(__name__)


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching engine)")
    s.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("RINGLINEAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RINGLINEAR_API_KEY, else open)")
    s.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the directory name; the run's name for a training run's "
                        "final/ or checkpoints/step-N)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", default="auto", help="auto (checkpoint torch_dtype), bfloat16, float16, float32")
    s.add_argument("--max-num-seqs", type=int, default=64, help="running requests at once (= linear-state slots)")
    s.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prefill piece size (multiple of 64)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: from memory)")
    s.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory for the KV cache (default: 80%% of free GPU memory, 1 GiB on CPU)")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit (prompt + output)")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--batch-invariant", choices=("auto", "on", "off"), default="auto",
                   help="fixed-block GEMMs so results do not depend on the batch (auto: on for CPU)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--tp", type=int, default=1,
                   help="tensor parallel ranks on this node (one GPU each): attention heads, dense layers and the "
                        "shared expert split, routed experts split by expert; must divide the model's heads and "
                        "its linear-attention norm groups (group_norm_size)")
    s.add_argument("--ep", type=int, default=1,
                   help="expert parallel ranks on this node: only the routed experts split (with --tp > 1: equal "
                        "to it)")
    s.add_argument("--drain-timeout", type=float, default=None,
                   help="on shutdown, seconds to wait for in-flight requests (default: until they finish)")
    s.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body accepted, larger ones get 413 (default: 32 bytes per token of "
                        "--max-model-len, at least 1 MiB: 4 MiB for a 128K context)")
    s.set_defaults(func=cmd_serve)


def build_engine(args):
    from ..engine import EngineConfig, LLMEngine
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk=args.prefill_chunk, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30),
        max_model_len=args.max_model_len, device=args.device, dtype=args.dtype,
        batch_invariant={"auto": None, "on": True, "off": False}[args.batch_invariant],
        cuda_graphs=not args.enforce_eager, cpu_threads=args.threads, tensor_parallel=args.tp,
        expert_parallel=args.ep)
    return LLMEngine(args.model, cfg)


def default_model_name(model_dir: str) -> str:
    """The model id to serve a directory under: its name, or the run's for a training run's output
    (`runs/demo/final` -> `demo`, `runs/demo/checkpoints/step-0000500` -> `demo-step-0000500`)."""
    path = os.path.normpath(os.path.abspath(model_dir))
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name == "final" and os.path.basename(parent):
        return os.path.basename(parent)
    if re.fullmatch(r"step-\d+", name) and os.path.basename(parent) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(parent))}-{name}"
    return name


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, claimed before the model loads: a port in use fails in a second, not after it."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number (0..65535)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("ringlinear serve needs fastapi and uvicorn: pip install 'ringlinear[serve]'") from None
    from ..engine.async_engine import AsyncEngine
    from .app import create_app

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory {args.model} does not exist")
    if args.tp != 1 or args.ep != 1:  # refused before the port is taken and before any rank starts
        from ..models.config import RingLinearConfig
        from ..parallel.tensor import check_serving_parallel
        check_serving_parallel(RingLinearConfig.from_json(args.model), args.tp, args.ep)
    if args.max_request_bytes is not None and args.max_request_bytes < 1024:
        raise ValueError(f"--max-request-bytes {args.max_request_bytes} is too small to hold a request (>= 1024)")
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s without --api-key: anyone who can reach this port can use the model", args.host)
    name = args.served_model_name or default_model_name(args.model)
    with bind_socket(args.host, args.port) as sock:
        engine = AsyncEngine(build_engine(args))
        app = create_app(engine, name, api_key=args.api_key, drain_timeout=args.drain_timeout,
                         max_request_bytes=args.max_request_bytes)
        log.info("serving %r on http://%s:%d/v1 (api key %s)", name, args.host, args.port,
                 "required" if args.api_key else "not required")
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_keep_alive=5))
        try:
            server.run(sockets=[sock])  # Ctrl-C: stop accepting, finish in-flight responses, run the lifespan shutdown
        except KeyboardInterrupt:  # uvicorn re-raises the captured signal after its graceful shutdown
            pass
        finally:
            engine.shutdown()
            engine.engine.close()  # the other ranks of --tp / --ep
    log.info("server stopped cleanly")
    return 0
