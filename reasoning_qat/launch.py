"""`rqat run` started by a launcher the user runs (torchrun, `accelerate launch`), on one node or several.

Every process of the launch runs `rqat run RECIPE`. Global rank 0 is the only one that writes the run
directory: it takes the run lock and runs the stages single-process, as a plain `rqat run` does (the
launcher's distributed environment is set aside, so the demo teacher's or GRPO's Trainer does not wait for
peers). When it reaches the qat stage it asks every rank to train: each process (rank 0 included) starts one
training worker with the launcher's environment restored, the workers rendezvous through the launcher
(MASTER_ADDR/MASTER_PORT) and train data-parallel; rank 0's worker saves. The other ranks only follow:
they wait for rank 0's requests and for its end, writing nothing. The run directory must be shared by every
node (the requests are files in it: `<run>/.launch/<session>/`).

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST --master-port 29500 \\
        -m reasoning_qat.cli run RECIPE
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the launcher's variables that make a process part of a distributed job
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
             "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "ACCELERATE_USE_DEEPSPEED")
SAVED: dict[str, str] | None = None  # the launcher's environment, set aside by `set_aside` (None: not launched)
POLL_S = 0.5
HEARTBEAT_S = 10  # rank 0 touches <session>/heartbeat this often; followers give up when it stops for 12x that


def launched_by_user() -> bool:
    """True in a process a user's launcher started as one of several (torchrun, accelerate launch), as opposed
    to the workers `rqat run` starts itself (RQAT_WORKER) or a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and not os.environ.get("RQAT_WORKER")


def set_aside() -> int:
    """Remove the launcher's variables from this process's environment (kept in SAVED for the training
    workers) and return this process's global rank."""
    global SAVED
    SAVED = {k: os.environ.pop(k) for k in DIST_VARS if k in os.environ}
    return int(SAVED["RANK"])


def session_dir(run_dir: Path) -> Path:
    """This launch's request folder: the same for every rank (named after the launcher's rendezvous)."""
    key = "/".join(SAVED.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                                                "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE"))
    return Path(run_dir) / ".launch" / hashlib.sha256(key.encode()).hexdigest()[:12]


def start_session(run_dir: Path) -> Path:
    """Rank 0: a clean request folder for this launch, and a heartbeat in it (a file touched every HEARTBEAT_S
    seconds while rank 0 lives: the followers on other nodes cannot see its process, only the shared folder)."""
    import threading

    d = session_dir(run_dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)

    def beat():
        while d.is_dir():
            (d / "heartbeat").touch()
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, daemon=True).start()
    return d


def end_session(run_dir: Path, status: int) -> None:
    """Rank 0: tell the followers the run is over (they exit with `status`)."""
    _write(session_dir(run_dir) / "finished.json", {"status": status})


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def worker_command(run_dir: Path, out: Path, inputs: dict[str, Path]) -> list[str]:
    """The training worker of the qat stage (stages/qat.py `_worker_main`)."""
    return ([sys.executable, "-m", "reasoning_qat.stages.qat", "--run-dir", str(run_dir), "--out", str(out)]
            + [f"--input={k}={v}" for k, v in inputs.items()])


def run_worker(cmd: list[str]) -> int:
    """One training worker with the launcher's environment restored; its exit status."""
    return subprocess.run(cmd, env={**os.environ, **SAVED, "RQAT_WORKER": "1"}).returncode


def train_everywhere(ctx) -> int:
    """Rank 0, in the qat stage: ask every rank to start its worker, start its own, and wait for it."""
    cmd = worker_command(ctx.run_dir, ctx.out, ctx.inputs)
    d = session_dir(ctx.run_dir)
    n = len(list(d.glob("request-*.json")))
    _write(d / f"request-{n}.json", {"cmd": cmd})
    return run_worker(cmd)


def follow(run_dir: Path, started: float, timeout_s: float = 24 * 3600) -> int:
    """A rank other than 0: run a worker for each of rank 0's requests until rank 0 says it is finished;
    return its status, or 1 when rank 0 is gone (its heartbeat stopped, or never started within 10 minutes)."""
    d, served = session_dir(run_dir), set()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        beat = d / "heartbeat"
        last = beat.stat().st_mtime if beat.is_file() and beat.stat().st_mtime >= started - 1 else started
        if time.time() - last > (12 * HEARTBEAT_S if beat.is_file() else 600):
            print(f"rqat follower: rank 0 stopped answering ({d / 'heartbeat'} is not updated); stopping",
                  file=sys.stderr)
            return 1
        for req in sorted(d.glob("request-*.json")) if d.is_dir() else []:
            if req.name not in served and req.stat().st_mtime >= started - 1:
                served.add(req.name)
                status = run_worker(json.loads(req.read_text())["cmd"])
                if status != 0:
                    print(f"rqat follower: the training worker exited with status {status}", file=sys.stderr)
        done = d / "finished.json"
        if done.is_file() and done.stat().st_mtime >= started - 1:
            return int(json.loads(done.read_text())["status"])
        time.sleep(POLL_S)
    print(f"rqat follower: rank 0 did not finish within {timeout_s:.0f} s", file=sys.stderr)
    return 1
