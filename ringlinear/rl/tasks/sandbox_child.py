"""Runs inside the sandboxed subprocess (`python -I -S sandbox_child.py`, cwd = its own temp dir). Standalone:
imports nothing from ringlinear. The parent (sandbox.py) sends one JSON job on stdin:

    {"code": str, "entry": str, "cases": [[arg, ...], ...], "dir": str, "uid": int|null, "gid": int|null,
     "cpu_s": int, "memory_bytes": int, "output_bytes": int}

Order matters; each step closes a door before the untrusted code runs:
1. import the allowed modules (their files are read now, before any file access is policed; the interpreter may
   live where only its owner can read, e.g. under /root)
2. drop to an unprivileged user when started as root (so RLIMIT_NPROC applies and the file system protects itself)
3. resource limits: CPU seconds, address space, no new processes or threads, file size (caps output), few fds
4. an audit hook (PEP 578) that refuses process creation, signals, sockets, ctypes, frame and gc introspection,
   new imports, raising limits, file changes, and opening files outside the temp dir (reads: also the stdlib)
5. the code runs with builtins whose __import__ accepts only the allowed modules

Results: the function's return value for each case, JSON-encoded, in one line after MARKER. The expected outputs
never enter this process, so nothing the code prints or forges can make a wrong answer pass.
"""
import json
import os
import resource
import sys
import sysconfig

MARKER = "\x1eRINGLINEAR-SANDBOX-RESULT "
ALLOWED = ("math", "cmath", "itertools", "functools", "collections", "collections.abc", "heapq", "bisect", "re",
           "string", "typing", "dataclasses", "fractions", "decimal", "statistics", "operator", "copy", "random",
           "datetime", "json", "enum", "abc", "numbers", "array", "textwrap", "unicodedata", "time")
_BLOCKED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
            "os.putenv", "os.unsetenv", "os.chdir", "os.chmod", "os.chown", "os.chflags", "os.lchown", "os.link",
            "os.symlink", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.utime",
            "os.setxattr", "os.removexattr", "os.startfile", "subprocess.", "_posixsubprocess.", "socket.", "ctypes.",
            "sys._getframe", "sys._current_frames", "sys.addaudithook", "sys.setprofile", "sys.settrace", "import",
            "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
            "shutil.", "pty.", "mmap.", "builtins.input", "marshal.load", "pickle.find_class", "code.__new__",
            "cpython.run_", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.",
            "telnetlib.", "sqlite3.", "glob.", "os.walk")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _limits(job):
    cpu = int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # fork and threads fail (counted per user: see uid drop)
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["output_bytes"], job["output_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))


def _under(path, roots):
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _audit_hook(home, read_roots):
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return  # an already-open descriptor (stdout, ...)
            real = os.path.realpath(os.fsdecode(path))
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if not _under(real, (home,) if writing else read_roots):
                raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {real} is not allowed")
        elif event in ("os.listdir", "os.scandir"):
            p = args[0]
            real = os.path.realpath(os.fsdecode(p)) if p is not None and not isinstance(p, int) else home
            if not _under(real, (home,)):
                raise PermissionError(f"sandbox: listing {real} is not allowed")
        elif event.startswith(_BLOCKED):
            raise PermissionError(f"sandbox: {event} is not allowed")
    return hook


def _guarded_builtins():
    import builtins
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or name not in ALLOWED:
            raise ImportError(f"sandbox: import of {name!r} is not allowed")
        return real_import(name, globals, locals, fromlist, level)

    b = dict(builtins.__dict__)
    b["__import__"] = guarded_import
    for name in ("input", "breakpoint", "help", "exit", "quit", "copyright", "credits", "license"):
        b.pop(name, None)
    return b


def main():
    job = json.loads(sys.stdin.read())
    out = sys.stdout
    for m in ALLOWED:
        __import__(m)
    home = os.path.realpath(job["dir"])
    paths = sysconfig.get_paths()
    read_roots = tuple(sorted({home, *(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib"))}))
    if job.get("uid") is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
    _limits(job)
    code, entry, cases = job["code"], job["entry"], job["cases"]
    del job
    sys.addaudithook(_audit_hook(home, read_roots))
    ns = {"__builtins__": _guarded_builtins(), "__name__": "__sandbox__"}
    results = []
    try:
        exec(compile(code, "<completion>", "exec"), ns)
        fn = ns.get(entry)
        load_error = None if callable(fn) else f"the code does not define {entry}()"
    except BaseException as e:  # the code may raise anything, SystemExit included: it simply scores 0
        load_error = f"{type(e).__name__}: {e}"
    for args in cases:
        if load_error is not None:
            results.append({"ok": False, "error": load_error})
            continue
        try:
            value = fn(*args)
            results.append({"ok": True, "value": json.loads(json.dumps(value))})
        except BaseException as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    out.write("\n" + MARKER + json.dumps(results) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
