"""Hostile completions through the code task's sandbox: each scores 0, nothing escapes, the run goes on.

The canary lives in a world-writable directory so that only the sandbox (not file permissions) protects it."""
import os
import time

import pytest

from ringlinear.rl.tasks import Prompt, sandbox
from ringlinear.rl.tasks.code import CodeTask, program
from ringlinear.rl.tasks.problems import PROBLEMS
from ringlinear.rl.tasks.sandbox import Limits, run_code, unshare_prefix

FAST = Limits(cpu_s=1, wall_s=3, memory_mb=256, output_bytes=1 << 14)

HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "sleep past the wall clock": "    import time\n    time.sleep(60)\n",
    "fork bomb via os": "    import os\n    while True:\n        os.fork()\n",
    "fork bomb via a module's os": "    import random\n    while True:\n        random._os.fork()\n",
    "huge output": "    print('x' * 10**7)\n    return a + b\n",
    "endless output": "    while True:\n        print('y' * 1000)\n",
    "write outside": "    open(CANARY, 'w').write('pwned')\n    return a + b\n",
    "low-level write outside": ("    import random\n    fd = random._os.open(CANARY, 1)\n"
                                "    random._os.write(fd, b'pwned')\n    return a + b\n"),
    "delete outside": "    import random\n    random._os.remove(CANARY)\n    return a + b\n",
    "shell via subclasses": ("    for c in ().__class__.__base__.__subclasses__():\n"
                             "        if c.__name__ == '_wrap_close':\n"
                             "            c.__init__.__globals__['system']('echo pwned > ' + CANARY)\n"
                             "    return a + b\n"),
    "read /etc/passwd": "    return len(open('/etc/passwd').read()) * 0 + a + b\n",
    "import subprocess": "    import subprocess\n    subprocess.run(['sh', '-c', 'echo pwned > ' + CANARY])\n"
                         "    return a + b\n",
    "import socket": "    import socket\n    socket.create_connection(('1.1.1.1', 80))\n    return a + b\n",
    "import ctypes": "    import ctypes\n    return a + b\n",
    "memory bomb": "    x = bytearray(10**10)\n    return a + b\n",
    "exit early": "    import random\n    random._os._exit(0)\n",
    "thread": "    import random\n    random._os.sys.modules['_thread'].start_new_thread(print, ())\n    return a + b\n",
    "leave the process group": "    import random\n    random._os.setsid()\n    while True:\n        pass\n",
    "forge a result line": ("    print('\\n\\x1eRINGLINEAR-SANDBOX-RESULT [{\"ok\": true, \"value\": 3}]')\n"
                            "    return -1\n"),
}


@pytest.fixture
def canary(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o777)
    c = d / "canary"
    c.write_text("untouched")
    os.chmod(c, 0o666)
    return str(c)


def _alive(pid):
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        pass
    else:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_good_solution_passes():
    add = PROBLEMS[0]
    r = run_code(program(add, "    return a + b\n"), add.entry, [list(a) for a, _ in add.cases], FAST)
    assert r.status == "ok"
    assert [x["value"] for x in r.results] == [e for _, e in add.cases]


def test_hostile_completions_score_zero_and_harm_nothing(canary, monkeypatch):
    task = CodeTask(seed=0, workers=2, limits=FAST)
    add = next(i for i, p in enumerate(PROBLEMS) if p.entry == "add")
    names = list(HOSTILE)
    comps = [HOSTILE[n].replace("CANARY", repr(canary)) for n in names] + ["    return a + b\n"]
    prompts = [Prompt(PROBLEMS[add].prompt, {"problem": add}) for _ in comps]
    seen_pids = []

    def spy(*a, **k):
        r = run_code(*a, **k)
        seen_pids.append(r.pid)
        return r
    monkeypatch.setattr(sandbox, "run_code", spy)
    t0 = time.perf_counter()
    try:
        scores = task.score(prompts, comps)
    finally:
        task.close()
    elapsed = time.perf_counter() - t0
    for name, s in zip(names, scores):
        assert s.reward == 0.0, name
    assert scores[-1].reward == 1.0  # the run goes on: a correct completion in the same batch still scores
    with open(canary) as f:
        assert f.read() == "untouched"
    assert len(seen_pids) == len(comps)
    assert not [p for p in seen_pids if _alive(p)]  # no process of any run is left
    assert elapsed < len(comps) * FAST.wall_s  # two workers in parallel, and nothing hung past its wall clock


def test_stdout_forgery_is_ignored():
    # the parent compares decoded return values with expected ones the child never sees
    add = PROBLEMS[0]
    r = run_code(program(add, HOSTILE["forge a result line"]), add.entry, [[1, 2]], FAST)
    assert r.status == "ok" and r.results == [{"ok": True, "value": -1}]


def test_no_network_namespace_or_socket_guard():
    code = ("def f():\n    import random\n    s = random._os.sys.modules.get('socket')\n"
            "    return 'no socket module' if s is None else str(s.socket().connect(('1.1.1.1', 80)))\n")
    r = run_code(code, "f", [[]], FAST)
    assert r.status == "ok" and not (r.results[0].get("ok") and r.results[0]["value"] != "no socket module")
    print("network namespace:", bool(unshare_prefix()))


def test_limits_are_enforced_by_the_os():
    # RLIMIT_NPROC (0 processes) holds even where the audit hook is not consulted: _thread is a C call
    code = ("def f():\n    import random\n    t = random._os.sys.modules['_thread']\n"
            "    try:\n        t.start_new_thread(int, ())\n        return 'thread started'\n"
            "    except RuntimeError as e:\n        return 'refused'\n")
    r = run_code(code, "f", [[]], FAST)
    assert r.status == "ok" and r.results[0] == {"ok": True, "value": "refused"}
