"""The command-line trainer as users run it: a real checkpoint file, a two-process DDP run under torchrun
(gloo on CPU) against a single process on the combined batch, and kill -9 in the middle of a run followed by
a resume, against an uninterrupted run.

Flux (a DiT) from separate files, as ComfyUI loads it: --unet (a diffusion_models file UNETLoader detects as Flux,
here with --weight-dtype fp8_e5m2), --clip (a text encoder file, CLIPLoader's type stable_diffusion) and --vae; the
same Trainer writes an adapter shaped for the blocks ComfyUI detects in the file. The files are random (scripts/
random_flux.py), written by the test: ComfyUI's Flux detection fixes the width to Flux dev's (hidden 3072, 24 heads,
RoPE axes 16/56/56, MLP ratio 4; a narrower file is not detected as Flux, checked below), so the model has one double
block only (0.37 G parameters; single blocks train in test_flux_train.py) and text as wide as CLIP-L's: T5-XXL alone
is 4.7 G parameters, so the Flux recipe's two files (clip_l + t5xxl, --clip-type flux) cannot run here; the CLI hands
--clip and --clip-type to comfy.sd.load_clip exactly as DualCLIPLoader does. Wrong flag combinations are refused
before anything loads, with the flags to pass instead."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

import random_flux
import train as train_cli  # scripts/ is on sys.path (conftest.py)
from conftest import COMFYUI, ROOT
from helpers import make_face_dataset

TRAIN = os.path.join(ROOT, "scripts", "train.py")
# the narrowest Flux ComfyUI detects (see the docstring), with CLIP-L's text width (768 tokens and pooled)
FLUX_CLI = dict(random_flux.DEV_WIDTH, depth=1, depth_single_blocks=0)


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
    return state_of(out, "run")


def state_of(out, name):
    with safe_open(os.path.join(out, f"{name}.train-state.safetensors"), "pt") as f:
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


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A random Flux diffusion_models file (fp8, 0.37 GB), a random CLIP-L and a random 16-channel VAE, written one
    tensor at a time in a child process so its memory never adds to this one's."""
    d = tmp_path_factory.mktemp("flux_cli_files")
    paths = {k: str(d / f"{k}.safetensors") for k in ("unet", "clip_l", "vae")}
    code = ("import sys; sys.path[:0] = [{c!r}, {s!r}]; import comfy.cli_args; comfy.cli_args.args.cpu = True; "
            "import torch, random_flux as rf; p = {p!r}; rf.write_flux_vae(p['vae'], seed=3); "
            "rf.write_clip_l(p['clip_l'], seed=1); rf.write_flux_unet(p['unet'], seed=0, dtype=torch.float8_e5m2, cfg={cfg!r})"
            ).format(c=COMFYUI, s=os.path.join(ROOT, "scripts"), p=paths, cfg=FLUX_CLI)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600, env=env())
    return paths


def detected(path):
    """ComfyUI's own detection of a diffusion_models file (comfy.model_detection, as UNETLoader runs it), from the
    header's shapes only, and the detected model built on the meta device: (model config, diffusion model)."""
    import comfy.model_detection
    with safe_open(path, "pt") as f:
        sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    assert cfg is not None, f"ComfyUI does not detect {path}"
    import comfy.ldm.flux.model
    import comfy.ops
    kw = {k: v for k, v in cfg.unet_config.items() if k != "image_model"}
    with torch.device("meta"):
        dm = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32, **kw)
    return cfg, dm


def test_the_narrowest_flux_comfyui_detects_is_flux_dev_wide(tmp_path):
    """Why the CLI test's model is 3072 wide: ComfyUI detects the file as Flux, and reads hidden size and depths off
    it, but fixes heads (24) and RoPE axes (128 per head); a narrow file (random_flux.SMALL's 64) then cannot be built."""
    narrow = str(tmp_path / "narrow.safetensors")
    random_flux.write_flux_unet(narrow, cfg=dict(random_flux.SMALL, depth=1, depth_single_blocks=0))
    with pytest.raises(ValueError, match="num_heads 24|positional dim"):
        detected(narrow)


def flux_cli(files, data, out, steps, extra=()):
    return [sys.executable, TRAIN, "--unet", files["unet"], "--weight-dtype", "fp8_e5m2", "--clip", files["clip_l"],
            "--vae", files["vae"], "--data", str(data), "--out", str(out), "--name", "flux", "--cpu", "--resolution", "64",
            "--steps", str(steps), "--batch-size", "1", "--save-every", "1", "--seed", "3", "--init", "random",
            "--lr", "1e-3", "--reference-dropout", "0", *extra]


def test_flux_from_separate_files_trains_an_adapter_for_its_blocks(flux_files, data, tmp_path):
    """--unet/--clip/--vae: two steps of the one Trainer on a Flux file; the adapter file loads (IDFusionAdapter.load
    checks it) and has one Linear_kf/Linear_vf pair per joint-attention block ComfyUI detects in the file, at its width;
    the training state records both finite losses and the weights moved from their seeded init."""
    from idfusion_pack.idfusion import patch_flux
    from idfusion_pack.idfusion.adapter import IDFusionAdapter
    run = subprocess.run(flux_cli(flux_files, data, tmp_path, 2), env=env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "adapter: " in run.stdout and "2 steps" in run.stdout, run.stdout
    cfg, dm = detected(flux_files["unet"])
    assert type(cfg).__name__ == "Flux" and cfg.unet_config["hidden_size"] == 3072, cfg.unet_config
    adapter = IDFusionAdapter.load(str(tmp_path / "flux.safetensors"))
    assert adapter.family == "Flux"
    assert adapter.layers == patch_flux.find_layers(dm) == [patch_flux.find_layers(dm)[0]]
    for layer in adapter.layers:
        assert tuple(adapter.to_k_f[layer.name].weight.shape) == tuple(adapter.to_v_f[layer.name].weight.shape) == (3072, 3072)
    step, losses, weights = state_of(tmp_path, "flux")
    assert step == 2 and len(losses) == 2 and all(np.isfinite(losses)), losses
    with torch.random.fork_rng(devices=[]):  # the seeded init the run started from (--init random --seed 3)
        torch.manual_seed(3)
        fresh = IDFusionAdapter(patch_flux.find_layers(dm), "Flux")
    for k, v in fresh.state_tensors().items():
        assert not torch.equal(weights[f"adapter.{k}"], v), f"{k} did not train"


@pytest.mark.parametrize("flags,says", [
    (["--checkpoint", "m.safetensors", "--unet", "u.safetensors"], ["--checkpoint", "--unet", "separate files"]),
    ([], ["no model", "--checkpoint", "--unet, --clip and --vae"]),
    (["--unet", "u.safetensors", "--vae", "v.safetensors"], ["without --clip", "pass all three"]),
    (["--unet", "u", "--clip", "c", "--vae", "v", "--clip-type", "fluxx"], ["--clip-type 'fluxx'", "flux", "sd3"]),
    (["--unet", "u", "--clip", "a", "b", "c", "--vae", "v"], ["one or two text encoder files", "got 3"]),
    (["--checkpoint", "m", "--weight-dtype", "fp8_e5m2"], ["--weight-dtype goes with --unet"]),
    (["--unet", "no_such_unet.safetensors", "--clip", __file__, "--vae", __file__], ["--unet no_such_unet.safetensors: no such file"]),
])
def test_wrong_source_flags_are_refused_before_anything_loads(capsys, tmp_path, flags, says):
    with pytest.raises(SystemExit) as e:
        train_cli.parse([*flags, "--data", str(tmp_path), "--out", str(tmp_path), "--cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    for s in says:
        assert s in err, err
