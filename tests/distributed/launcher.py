"""Run a vlft command on several CPU processes through `vlft_launch` (scripts/_common.sh), as the scripts do:
torchrun for DDP, the DeepSpeed launcher for ZeRO. Shared by the tests in this folder."""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import REPO

TIMEOUT = 300  # a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PREBUILT: set = set()


def prebuild_deepspeed_comm(env: dict) -> None:
    """Compile DeepSpeed's CPU shared-memory all-reduce op once, in one process, before the first ZeRO launch:
    otherwise both ranks of that launch build it at the same moment in the same folder, a race that made a
    first ZeRO test fail now and then on a fresh clone. Best effort: a failure here leaves the launch to build it."""
    key = env.get("TORCH_EXTENSIONS_DIR", "")
    if key in _PREBUILT:
        return
    _PREBUILT.add(key)
    try:
        subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                       env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, timeout=TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        pass


def launch(command: str, argv: list[str], *, zero: str | None, nproc: int = 2, port: int | None = None,
           expect_success: bool = True) -> subprocess.CompletedProcess:
    """`vlft <command> argv` on `nproc` processes (ZeRO config `zero_configs/<zero>.json`, or DDP when None).
    Fails the test on a hang (TIMEOUT), on a non-zero exit unless `expect_success` is false, and when the run
    left DeepSpeed shared memory behind."""
    port = port or free_port()
    env = {**os.environ, "PYTHON": sys.executable, "NUM_GPUS": str(nproc), "MASTER_PORT": str(port),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    env.pop("ZERO_CONFIG", None)
    if zero:
        env["ZERO_CONFIG"] = str(REPO / "zero_configs" / f"{zero}.json")
        prebuild_deepspeed_comm(env)
    cmd = f'source "{REPO}/scripts/_common.sh"; vlft_launch {command} "$@"'
    # its own session, so that a hang kills the launcher's whole process tree (the ranks hold the pipes open)
    with subprocess.Popen(["bash", "-c", cmd, "launch", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"no result after {TIMEOUT} s (hang?):\n{stderr[-4000:]}")
    if expect_success:
        assert proc.returncode == 0, stderr[-4000:]
    # DeepSpeed's CPU all-reduce names its shared memory by port; nothing of this run may stay in /dev/shm
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, leaked
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
