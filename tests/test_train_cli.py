"""The command-line trainer as users run it: a real checkpoint file, a two-process DDP run under torchrun
(gloo on CPU) against a single process on the combined batch, and kill -9 in the middle of a run followed by
a resume, against an uninterrupted run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from conftest import COMFYUI, ROOT
from helpers import make_face_dataset

TRAIN = os.path.join(ROOT, "scripts", "train.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_face_dataset(tmp_path_factory.mktemp("cli_faces"))


def cli(ckpt, data, out, steps, nproc=1, extra=()):
    args = [TRAIN, "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--name", "run", "--cpu",
            "--resolution", "64", "--steps", str(steps), "--batch-size", "2", "--save-every", "1", "--seed", "3",
            "--init", "random", "--lr", "1e-3", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), *args]


def env():
    return {**os.environ, "COMFYUI_PATH": COMFYUI, "OMP_NUM_THREADS": "1"}


def state(out):
    with safe_open(os.path.join(out, "run.train-state.safetensors"), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys() if k.startswith("adapter.")}
    return int(meta["step"]), [l for _, l in json.loads(meta["losses"])], weights


@pytest.fixture(scope="module")
def uninterrupted(random_checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run(cli(random_checkpoint, data, out, 3), env=env(), check=True, timeout=600)
    return state(out)


def test_two_process_ddp_gives_the_single_process_loss(random_checkpoint, data, tmp_path, uninterrupted):
    subprocess.run(cli(random_checkpoint, data, tmp_path, 2, nproc=2), env=env(), check=True, timeout=600)
    step, losses, _ = state(tmp_path)
    assert step == 2
    assert losses == pytest.approx(uninterrupted[1][:2], rel=1e-4)


def test_kill_9_mid_run_then_resume_matches_uninterrupted(random_checkpoint, data, tmp_path, uninterrupted):
    proc = subprocess.Popen(cli(random_checkpoint, data, tmp_path, 3), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "run.train-state.safetensors"
    deadline = time.time() + 600
    try:
        while not path.exists():  # the first checkpoint (step 1) is written atomically: kill right after it lands
            assert proc.poll() is None, "the trainer exited before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = state(tmp_path)[0]
    assert 1 <= killed_at < 3
    subprocess.run(cli(random_checkpoint, data, tmp_path, 3), env=env(), check=True, timeout=600)
    step, losses, weights = state(tmp_path)
    assert step == 3
    assert losses == pytest.approx(uninterrupted[1], rel=1e-5)
    for k, v in uninterrupted[2].items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6)
