"""A rankwise CLI imported once that forks a child per request, for the kill loop of tests/test_hostile.py.

Why: a SIGKILL point is only informative while the command does its work (reading, decomposing, writing
OUT). A fresh ``rankwise`` process spends most of its life importing torch and transformers, so a kill loop
of fresh processes spends most of its kills, and of the suite's time, on imports. Here the imports happen
once; each request forks a child that runs ``rankwise.cli.main.run(argv)`` from that state, and the parent
kills it after the requested delay. No torch operation runs before a fork (no thread pool to inherit).

Protocol (one JSON object per line): request ``{"argv": [...], "kill_after": seconds or null}``; reply
``{"code": exit status or null if killed, "killed": bool, "hung": bool, "seconds": child lifetime}``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time

import torch  # noqa: F401  (imported before any fork: what every command needs)
import transformers  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401

import rankwise.cli.main as cli

#: What the two killed commands import lazily, imported here once (a child forked after this starts working
#: at once). A name that no longer exists fails the server's start, so this list cannot go stale unseen.
WARM = ["rankwise.cli.decompose_cmd", "rankwise.cli.eval_cmd", "rankwise.decomposition.apply",
        "rankwise.decomposition.svd", "rankwise.checkpoint", "rankwise.evaluation.runner",
        "rankwise.evaluation.tasks"]
for _name in WARM:
    importlib.import_module(_name)


#: A run not asked to be killed is killed after this long and reported as hung (a test fails, never waits).
HANG_SECONDS = 300.0


def _child(argv: list[str]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        cli.run(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code = 1
    os._exit(code)


def _serve(request: dict) -> dict:
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request["argv"])
    deadline = t0 + (HANG_SECONDS if request.get("kill_after") is None else float(request["kill_after"]))
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.005)
    code = None if killed else os.waitstatus_to_exitcode(status)
    hung = killed and request.get("kill_after") is None
    return {"code": code, "killed": killed, "hung": hung, "seconds": time.monotonic() - t0}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
