"""Run one untrusted Python program (model output) with limits, for code-generation evals.

Layers, each of which alone stops the common escapes:
- a separate process in its own session, in an empty temporary directory, with a scrubbed
  environment and `python -I` (no user site, no PYTHON* variables);
- rlimits: CPU seconds, address space, file size (stdout and stderr go to files in that directory,
  so the file-size limit also caps output), no core dumps, process count (not enforced for root);
- a wall-clock timeout that kills the whole process group;
- a fresh network namespace where the OS allows it (root, or unprivileged user namespaces):
  no interface but a downed loopback. `network_isolation()` says which one this machine gives;
- inside the interpreter, an audit hook (PEP 578) installed before the program runs: it refuses
  process creation (fork, exec, spawn, subprocess, os.system), sockets, ctypes, and opening or
  listing paths outside the program's directory except the interpreter's own library, so a fork
  bomb or a read of /etc/passwd fails at its first call even where RLIMIT_NPROC does not apply.
The audit hook is what stops a program of this interpreter; the process limits are what stop
anything that gets past it (and native code cannot import without ctypes/extension loading
outside the allowed library paths).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run: wall time (s), CPU time (s), memory (bytes), output (bytes)."""
    timeout_s: float = 6.0  # wall clock per run
    cpu_s: int = 5
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # any file written, stdout/stderr included
    processes: int = 64  # RLIMIT_NPROC (not enforced for root: the audit hook stops forks)


@dataclass(frozen=True)
class Result:
    """What a sandboxed run returned: exit code (None on timeout), stdout, stderr, timed_out, wall time (s)."""
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


# Runs inside the sandboxed interpreter before the program: the audit hook, then the program itself.
_PRELUDE = r'''
import sys, os
_root = os.path.realpath(os.getcwd())
_lib = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})
_deny = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill", "os.killpg",
         "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
         "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.chdir", "os.chroot",
         "os.putenv", "os.unsetenv", "os.symlink", "os.link", "os.rename", "os.remove",
         "os.rmdir", "shutil.rmtree", "os.truncate"}
_path_events = {"open", "os.listdir", "os.scandir", "os.walk", "glob.glob", "os.mkdir", "os.chmod", "os.chown",
                "os.utime", "os.startfile"}
def _inside(path, writing):
    if isinstance(path, int):
        return True  # an already-open descriptor (stdin/stdout)
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    if p == _root or p.startswith(_root + os.sep):
        return True
    return not writing and any(p == l or p.startswith(l + os.sep) for l in _lib)
def _hook(event, args):
    if event in _deny or event.startswith("ctypes."):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in _path_events and args:
        if event == "open":
            mode, flags = (list(args[1:3]) + [None, None])[:2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        else:
            writing = event not in ("os.listdir", "os.scandir", "os.walk", "glob.glob")
        if not _inside(args[0], bool(writing)):
            raise PermissionError(f"sandbox: {event} {args[0]!r} is outside the program's directory")
    if event == "import" and args and str(args[0]).split(".")[0] in {"ctypes", "_ctypes", "multiprocessing", "socket",
                                                                      "_socket", "subprocess", "pty", "signal"}:
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")
sys.addaudithook(_hook)
del _hook
__file__ = "solution.py"
with open("solution.py") as _f:
    _code = compile(_f.read(), "solution.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """'netns' (a fresh network namespace), 'userns+netns' (one inside an unprivileged user
    namespace), or 'none' (this OS lets neither: programs keep the machine's network, the audit
    hook alone refuses sockets). Probed once, in a child interpreter."""
    for name, flags in (("netns", CLONE_NEWNET), ("userns+netns", CLONE_NEWUSER | CLONE_NEWNET)):
        # a fresh interpreter probes (forking this one, which may run threads, could deadlock in the loader)
        probe = f"import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).unshare({flags}) == 0 else 1)"
        if subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, check=False).returncode == 0:
            return name
    return "none"


# A first interpreter (single-threaded, unlike an eval that runs programs from a thread pool, where
# a preexec_fn is unsafe) drops the network and sets the limits, then replaces itself by the one
# that runs the prelude and the program.
_LAUNCHER = r'''
import ctypes, os, resource, sys
flags, cpu, mem, fsize, nproc = map(int, sys.argv[1:6])
if flags and ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
    sys.exit("sandbox: could not enter a network namespace")
mb = 1024 * 1024
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem * mb, mem * mb))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize * mb, fsize * mb))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", sys.argv[6]])
'''


def run_program(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run `code` as a Python program with `stdin`; its stdout/stderr (capped by the file limit)."""
    isolation = network_isolation()
    flags = {"netns": CLONE_NEWNET, "userns+netns": CLONE_NEWUSER | CLONE_NEWNET}.get(isolation, 0)
    with tempfile.TemporaryDirectory(prefix="rqat_sandbox_") as tmp:
        d = Path(tmp)
        (d / "solution.py").write_text(code)
        (d / "stdin.txt").write_text(stdin)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with open(d / "stdin.txt", "rb") as fin, open(d / ".stdout", "wb") as fout, open(d / ".stderr", "wb") as ferr:
            args = [flags, limits.cpu_s, limits.memory_mb, limits.file_mb, limits.processes]
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _LAUNCHER, *map(str, args), _PRELUDE], cwd=tmp,
                                    env=env, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: whatever it started dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        wall = time.monotonic() - start
        read = lambda p: p.read_bytes()[: limits.file_mb * 1024 * 1024].decode("utf-8", "replace")
        return Result(None if timed_out else proc.returncode, read(d / ".stdout"), read(d / ".stderr"), timed_out, wall)
