"""`ringlinear serve --model DIR`: the OpenAI-compatible server. fastapi/uvicorn are imported only when it runs."""
from __future__ import annotations

import argparse
import gc
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
    s.add_argument("--quantization", choices=("fp8", "none"), default=None,
                   help="fp8: blockwise e4m3 weights with 128x128 scales, quantised at load (about half the weight "
                        "memory; docs/serving.md); none: the model dtype (dequantises an FP8 checkpoint); default: "
                        "as the checkpoint is stored")
    s.add_argument("--max-num-seqs", type=int, default=64, help="running requests at once (= linear-state slots)")
    s.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prefill piece size (multiple of 64)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: from memory)")
    s.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory for the KV cache (default: 80%% of free GPU memory, 1 GiB on CPU)")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit (prompt + output)")
    s.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="no sharing of computed prefixes (KV blocks, state snapshots) or of a prompt's prefill "
                        "between its n choices")
    s.add_argument("--state-snapshot-interval", type=int, default=None,
                   help="tokens between linear-state snapshots, a multiple of --prefill-chunk and --block-size "
                        "(default: their lcm)")
    s.add_argument("--state-snapshot-gib", type=float, default=None,
                   help="memory for state snapshots (default: a tenth of the KV cache's budget, taken from it)")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the last one's tokens reach the host (docs/serving.md; "
                        "default: on for CUDA)")
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
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template replacing the checkpoint's (checked before the model loads)")
    s.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body accepted, larger ones get 413 (default: 32 bytes per token of "
                        "--max-model-len, at least 1 MiB: 4 MiB for a 128K context)")
    s.set_defaults(func=cmd_serve)


def read_chat_template(path: str) -> str:
    """The template text of --chat-template FILE, rendered once on a two-turn conversation (with and without the
    generation prompt) so a broken template is a one-line ValueError now, not a 400 on every chat request."""
    from ..models.tokenizer import render_chat_template
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--chat-template {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {path}: cannot read it ({e})") from None
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    try:
        for gen in (True, False):
            render_chat_template(src, turns, add_generation_prompt=gen, tools=None, bos_token="", eos_token="")
    except Exception as e:  # noqa: BLE001  (any jinja error is the file's fault)
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ValueError(f"--chat-template {path}: not a usable chat template{where}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return src


def build_engine(args):
    from ..engine import EngineConfig, LLMEngine
    template = read_chat_template(args.chat_template) if getattr(args, "chat_template", None) else None
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk=args.prefill_chunk, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30),
        max_model_len=args.max_model_len, device=args.device, dtype=args.dtype,
        batch_invariant={"auto": None, "on": True, "off": False}[args.batch_invariant],
        cuda_graphs=not args.enforce_eager, async_scheduling=args.async_scheduling, cpu_threads=args.threads,
        enable_prefix_caching=args.prefix_caching,
        state_snapshot_interval=args.state_snapshot_interval,
        state_snapshot_bytes=None if args.state_snapshot_gib is None else int(args.state_snapshot_gib * 2**30),
        quantization=args.quantization, tensor_parallel=args.tp, expert_parallel=args.ep)
    engine = LLMEngine(args.model, cfg)
    if template is not None:
        if engine.tokenizer is None:
            raise ValueError("--chat-template needs the checkpoint's tokenizer")
        engine.tokenizer.chat_template = template
        log.info("chat template: %s (replaces the checkpoint's)", args.chat_template)
    # What exists now (modules, kernels, the engine, the imported libraries: ~2e5 objects) lives as long as the
    # server. Frozen, it is left out of Python's full collections, which a busy engine triggers every few steps and
    # which otherwise walk all of it (95 ms on a 2-core box) inside a step (docs/serving.md, "Host pauses"). Only
    # here, where the engine lives until exit: frozen objects in reference cycles are never collected, so a process
    # that builds and drops engines (benchmarks, tests) would keep every dropped engine's model and caches.
    gc.collect()
    gc.freeze()
    return engine


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
    if args.chat_template:
        read_chat_template(args.chat_template)  # before the socket and the model: a bad file fails in a second
    if args.tp != 1 or args.ep != 1:  # refused before the port is taken and before any rank starts
        from ..models.config import RingLinearConfig
        from ..parallel.tensor import check_serving_parallel
        check_serving_parallel(RingLinearConfig.from_json(args.model), args.tp, args.ep)
        if args.quantization == "fp8":
            raise ValueError("--quantization fp8 with --tp/--ep is not supported yet (serve FP8 weights on one GPU)")
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
