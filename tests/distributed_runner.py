"""Launch the kolora-probe suite (or a script) under torchrun in a subprocess, on the CPU (gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from suite_runner import ROOT, SuiteRun

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 170,
             no_python: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--no-python"] if no_python else []
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def torchrun_suite(model: Path, reports: Path, *args: str, **kw) -> SuiteRun:
    proc = torchrun("-m", "pytest", "-p", "no:cacheprovider", "-m", "distributed", f"--model={model}",
                    f"--reports-dir={reports}", *args, **kw)
    return SuiteRun(proc.returncode, proc.stdout + proc.stderr, reports)
