"""Run untrusted Python (a model's completion) against test inputs in a locked-down subprocess.

Each run gets a fresh temp dir (its cwd, HOME and TMPDIR) and its own session (process group), and is started as
`python -I -S sandbox_child.py` (isolated: no site, no user paths, no PYTHON* variables), in a new network
namespace when `unshare` works here (then there is no network at all; otherwise the child's audit hook refuses
sockets). What the child does before running the code is described in sandbox_child.py: unprivileged uid when
started as root, RLIMIT_CPU / RLIMIT_AS / RLIMIT_NPROC=0 / RLIMIT_FSIZE / RLIMIT_NOFILE, an audit hook, allowed
imports only. The parent adds a wall-clock timeout after which the process and its group are SIGKILLed, reads at
most `output_bytes` of output, and deletes the dir. Runs go through a small thread pool.

A hostile completion (infinite loop, fork bomb, huge output, writes outside its dir, reading /etc/passwd, imports
of os/subprocess/socket/ctypes) fails its cases and scores 0; tests/rl/test_sandbox.py feeds each of these.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .sandbox_child import MARKER

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
NOBODY = 65534


@dataclass
class Limits:
    cpu_s: int = 2                  # RLIMIT_CPU (SIGXCPU at the soft limit, SIGKILL one second later)
    wall_s: float = 6.0             # wall clock, then SIGKILL of the process and its group
    memory_mb: int = 512            # RLIMIT_AS
    output_bytes: int = 1 << 16     # RLIMIT_FSIZE of the child's files, and what the parent reads back


@dataclass
class RunResult:
    status: str                     # "ok" (results came back), "timeout", "crashed", "no_result"
    results: list = field(default_factory=list)  # per case: {"ok": bool, "value" | "error"}
    returncode: int | None = None
    pid: int | None = None          # its process group id too (tests check it is gone)
    stderr: str = ""


@functools.lru_cache(maxsize=None)
def unshare_prefix() -> tuple[str, ...]:
    """The command prefix that puts the child in a fresh network namespace, or () if that does not work here."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    cmd = (exe, "--net") if os.getuid() == 0 else (exe, "--user", "--net", "--map-current-user")
    try:
        ok = subprocess.run([*cmd, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return cmd if ok else ()


def _kill(proc: subprocess.Popen) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):  # the group, and the pid if it left it
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def run_code(code: str, entry: str, cases: list[list], limits: Limits | None = None) -> RunResult:
    """Define `entry` by running `code`, call entry(*args) for each case; return the JSON-encoded values."""
    lim = limits or Limits()
    d = tempfile.mkdtemp(prefix="ringlinear-sandbox-")
    root = os.getuid() == 0
    try:
        if root:
            os.chown(d, NOBODY, NOBODY)
        os.chmod(d, 0o700)
        job = json.dumps({"code": code, "entry": entry, "cases": cases, "dir": d, "uid": NOBODY if root else None,
                          "gid": NOBODY if root else None, "cpu_s": lim.cpu_s, "memory_bytes": lim.memory_mb << 20,
                          "output_bytes": lim.output_bytes})
        env = {"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        out_path, err_path = os.path.join(d, ".stdout"), os.path.join(d, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            if root:
                os.chown(out_path, NOBODY, NOBODY)
                os.chown(err_path, NOBODY, NOBODY)
            proc = subprocess.Popen([*unshare_prefix(), sys.executable, "-I", "-S", CHILD], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=d, env=env, start_new_session=True, close_fds=True)
        status = None
        try:
            proc.communicate(job.encode(), timeout=lim.wall_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _kill(proc)
            proc.wait()
        stdout = _read_capped(out_path, lim.output_bytes)
        stderr = _read_capped(err_path, 4096)
        results = _parse(stdout, len(cases))
        if status is None:
            status = "ok" if results is not None else ("crashed" if proc.returncode else "no_result")
        return RunResult(status, results or [], proc.returncode, proc.pid, stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _read_capped(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def _parse(stdout: str, n_cases: int):
    line = next((ln for ln in reversed(stdout.split("\n")) if ln.startswith(MARKER)), None)
    if line is None:
        return None
    try:
        res = json.loads(line[len(MARKER):])
    except ValueError:
        return None
    if not isinstance(res, list) or len(res) != n_cases or not all(isinstance(r, dict) for r in res):
        return None
    return res


class SandboxPool:
    """run_code over many jobs with `workers` subprocesses at a time; results in job order."""

    def __init__(self, workers: int = 2, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sandbox")

    def map(self, jobs: list[tuple[str, str, list]]) -> list[RunResult]:
        return list(self.pool.map(lambda j: run_code(*j, limits=self.limits), jobs))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
