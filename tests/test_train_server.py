"""IDFusion Train Adapter inside a REAL ComfyUI server (main.py --cpu), queued over HTTP, watched over the websocket as
the page watches it. ComfyUI executes nodes under torch.inference_mode() and loads the checkpoint there too, which is
what broke training before. The pack's synthetic faces model (models/synthetic_faces.safetensors: MODEL, CLIP, VAE from
its loader node) and a dataset of its drawn, captioned faces; without that file, the random SD1.5 checkpoint and
cartoon faces (much slower). 64 px, a few steps. One server for the module."""
import asyncio
import json
import os
import struct
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image
from safetensors import safe_open

import comfy_server  # scripts/ is on sys.path (conftest.py)
from conftest import COMFYUI, ROOT
from helpers import make_face_dataset

SYNTHETIC = os.path.join(ROOT, "models", "synthetic_faces.safetensors")
USE_SYNTHETIC = os.path.isfile(SYNTHETIC)

pytestmark = pytest.mark.e2e
TRAIN_NODE = "3"


class Socket:
    """ComfyUI's /ws for one client id, read in a thread (aiohttp): JSON events and binary progress texts."""

    def __init__(self, url: str, client_id: str):
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.events, self.texts = [], []      # (type, data) / (node, text)
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "could not connect to the websocket"

    async def _listen(self):
        import aiohttp
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await asyncio.wait_for(ws.receive(), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        m = json.loads(msg.data)
                        self.events.append((m["type"], m["data"]))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        kind, = struct.unpack(">I", msg.data[:4])
                        if kind == 3:  # BinaryEventTypes.TEXT: node id length, node id, text
                            n, = struct.unpack(">I", msg.data[4:8])
                            self.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

    def of(self, kind, prompt_id=None):
        return [d for t, d in list(self.events) if t == kind and (prompt_id is None or d.get("prompt_id") in (None, prompt_id))]

    def clear(self):
        self.events.clear()
        self.texts.clear()

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def synthetic_dataset(root):
    """Two drawn identities, two captioned pictures each (the model's closed caption vocabulary), at 64 px."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "synthetic"))
    import domain as D
    rng = np.random.default_rng(0)
    for k, ident in enumerate(D.identities("training", 2)):
        folder = _mkdir(root / f"person{k}")
        for i in range(2):
            scene = D.random_scene(rng)
            picture, _ = D.render([ident], scene, rng)
            Image.fromarray(D.upscale(picture)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(D.caption(scene))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("train_base")
    os.makedirs(base / "models" / "checkpoints")
    if USE_SYNTHETIC:
        synthetic_dataset(_mkdir(base / "input" / "idfusion_datasets" / "faces"))
    else:
        os.symlink(request.getfixturevalue("random_checkpoint"), base / "models" / "checkpoints" / "random_sd15.safetensors")
        make_face_dataset(_mkdir(base / "input" / "idfusion_datasets" / "faces"))
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable)
    srv.launch()
    try:
        srv.wait_ready(timeout=240)
        srv.socket = Socket(srv.url, srv.client_id)
        yield srv
        srv.socket.close()
    finally:
        srv.stop()


def _mkdir(p):
    p.mkdir(parents=True)
    return p


def workflow(name, steps):
    loader = {"class_type": "IDFusionSyntheticModelLoader", "inputs": {"model_name": "synthetic_faces.safetensors"}} \
        if USE_SYNTHETIC else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random_sd15.safetensors"}}
    return {
        "1": loader,
        TRAIN_NODE: {"class_type": "IDFusionTrainAdapter", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": "faces", "adapter_name": name,
            "steps": steps, "batch_size": 1, "learning_rate": 1e-3, "resolution": 64, "save_every": 1, "seed": 0,
            "init": "random", "reference": "other image", "reference_dropout": 0.0, "face_loss_weight": 0.0,
            "cgdr_weight": 0.0, "class_prompt": "a photo of a person", "encoding": "cached", "resume": True}},
    }


def state_step(server, name):
    path = os.path.join(server.dir("models"), "idfusion", "training", f"{name}.train-state.safetensors")
    if not os.path.isfile(path):
        return 0
    with safe_open(path, "pt") as f:
        return int(f.metadata()["step"])


def test_training_workflow_writes_adapter_and_loss_curve_and_reports_progress(server):
    ws = server.socket
    ws.clear()
    entry = server.wait(server.queue(workflow("served", 2)), timeout=900)
    root = os.path.join(server.dir("models"), "idfusion")
    assert sorted(os.listdir(root)) == ["served.safetensors", "training"]
    assert sorted(os.listdir(os.path.join(root, "training"))) == \
        ["served.loss.png", "served.safetensors", "served.train-state.safetensors"]
    with Image.open(os.path.join(root, "training", "served.loss.png")) as im:
        assert im.size == (640, 360)
    with safe_open(os.path.join(root, "served.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "idfusion.adapter" and len(list(f.keys())) == 2 * len(json.loads(f.metadata()["layers"]))
    assert state_step(server, "served") == 2
    ui = entry["outputs"][TRAIN_NODE]
    assert [s for s, _ in ui["idfusion_loss"]] == [1, 2]
    time.sleep(1)  # the last websocket messages follow the history entry closely
    # ComfyUI's progress bar, for this node, up to the step count
    bar = [d for d in ws.of("progress") if d["node"] == TRAIN_NODE]
    assert bar and bar[-1]["value"] == 2 and bar[-1]["max"] == 2, ws.events
    # the pack's own event for the page's loss chart, and the loss text under the node
    train = ws.of("idfusion.train")
    assert [(e["node"], e["step"], e["steps"]) for e in train] == [(TRAIN_NODE, 1, 2), (TRAIN_NODE, 2, 2)], train
    assert [e["loss"] for e in train] == pytest.approx([l for _, l in ui["idfusion_loss"]])
    assert [t for n, t in ws.texts if n == TRAIN_NODE][-1].startswith("step 2/2  loss "), ws.texts


def test_the_optional_schedule_and_augmentation_inputs_reach_the_training_and_bad_ones_are_refused(server):
    """lr_decay_steps and reference augmentation (optional widgets, after the required ones so older workflows keep
    their values) reach the run's TrainConfig, as its train state records; out-of-range values are refused naming
    the input, NaN before the prompt runs."""
    more = {"lr_decay_steps": 2, "reference_shift": 0.1, "reference_noise": 12.0, "reference_background": 0.5}
    p = workflow("augmented", 2)
    p[TRAIN_NODE]["inputs"].update(more)
    server.wait(server.queue(p), timeout=900)
    path = os.path.join(server.dir("models"), "idfusion", "training", "augmented.train-state.safetensors")
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert {k: config[k] for k in more} == more
    for field, value in (("lr_decay_steps", 3), ("reference_noise", float("nan")), ("reference_shift", 0.9)):
        p = workflow("refused", 2)
        p[TRAIN_NODE]["inputs"][field] = value
        with pytest.raises(comfy_server.ComfyServerError) as e:
            server.wait(server.queue(p), timeout=600)
        assert field in str(e.value), (field, str(e.value)[:500])
    assert state_step(server, "refused") == 0


def test_interrupt_keeps_the_last_checkpoint_and_queueing_again_resumes(server):
    ws = server.socket
    ws.clear()
    prompt_id = server.queue(workflow("stopped", 200))
    deadline = time.monotonic() + 900
    while len(ws.of("idfusion.train")) < 2:  # two steps done (each saved: save_every=1)
        assert time.monotonic() < deadline, "training did not start"
        server._check_alive("while training")
        time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"", method="POST"), timeout=30).read()
    with pytest.raises(comfy_server.ComfyServerError, match="interrupted"):
        server.wait(prompt_id, timeout=600)
    kept = state_step(server, "stopped")
    assert 2 <= kept < 200, kept
    assert os.path.isfile(os.path.join(server.dir("models"), "idfusion", "training", "stopped.loss.png"))
    assert not os.path.exists(os.path.join(server.dir("models"), "idfusion", "stopped.safetensors")), \
        "an interrupted run must not publish a final adapter"

    ws.clear()
    entry = server.wait(server.queue(workflow("stopped", kept + 2)), timeout=900)
    assert state_step(server, "stopped") == kept + 2
    time.sleep(1)
    assert [e["step"] for e in ws.of("idfusion.train")] == [kept + 1, kept + 2], "it did not continue from the checkpoint"
    history = entry["outputs"][TRAIN_NODE]["idfusion_loss"]
    assert [s for s, _ in history] == list(range(1, kept + 3))  # the whole curve, resumed steps included
    assert os.path.isfile(os.path.join(server.dir("models"), "idfusion", "stopped.safetensors"))


HOSTILE = ["../escape", "../../escape", "/tmp/idfusion_escape_abs", "a/escape", "a\\escape", "escape\n", "escape\r",
           "tab\tescape", "esc\x1b[31mape", "nul\x00escape", "..", ".", "escape" * 50, "C:\\escape", "~/escape",
           " escape", "escape ", "escape.safetensors", "%2e%2e%2fescape", "escape\u2028line"]


def _files(root):
    out = set()
    for d, dirs, files in os.walk(root):
        out.update(os.path.join(d, f) for f in files + dirs)
    return out


def test_no_name_input_writes_outside_models_and_output_or_puts_control_characters_in_names(server, tmp_path):
    """Every name input the pack takes (Save Identity's filename_prefix, Train's adapter_name and dataset, Encode's
    identity name), set to traversal, absolute, control-character and over-long values, over HTTP: each prompt is
    refused (at validation or by the node, naming the input), and nothing is written outside models/ and output/."""
    from conftest import ROOT, small_unet
    from helpers import random_identity
    base = server.base_dir
    ids = os.path.join(server.dir("models"), "idfusion", "identities")
    os.makedirs(ids, exist_ok=True)
    random_identity(small_unet(), refs=1).save(os.path.join(ids, "seed.safetensors"))
    from helpers import face
    face((200, 160, 140)).save(os.path.join(server.dir("input"), "face.png"))
    watched = [os.path.dirname(base)]  # the server's base directory and its neighbours
    before = _files(watched[0])

    def save_identity(v):
        return {"1": {"class_type": "IDFusionLoadIdentity", "inputs": {"identity_name": "identities/seed.safetensors"}},
                "2": {"class_type": "IDFusionSaveIdentity", "inputs": {"identity": ["1", 0], "filename_prefix": v}}}

    def train(field):
        def prompt(v):
            p = workflow("ok_name", 1)
            p[TRAIN_NODE]["inputs"][field] = v
            return p
        return prompt

    def encode(v):
        p = workflow("unused", 1)
        del p[TRAIN_NODE]
        p.update({"5": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
                  "6": {"class_type": "IDFusionEncodeReference", "inputs": {"model": ["1", 0], "vae": ["1", 2],
                        "reference_images": ["5", 0], "timestep": 0, "name": v}},
                  "7": {"class_type": "IDFusionSaveIdentity", "inputs": {"identity": ["6", 0], "filename_prefix": "enc"}}})
        return p

    refused = []
    for field, make in (("filename_prefix", save_identity), ("adapter_name", train("adapter_name")),
                        ("dataset", train("dataset")), ("name", encode)):
        for value in HOSTILE:
            with pytest.raises(comfy_server.ComfyServerError) as e:
                server.wait(server.queue(make(value)), timeout=600)
            assert field in str(e.value), (field, value, str(e.value)[:500])
            refused.append((field, value))
    assert len(refused) == 4 * len(HOSTILE)
    new = set().union(*(_files(w) for w in watched)) - before
    allowed = (os.path.join(base, "models") + os.sep, os.path.join(base, "output") + os.sep,
               os.path.join(base, "temp") + os.sep, os.path.join(base, "user") + os.sep)
    assert [p for p in new if not p.startswith(allowed)] == []
    assert not os.path.exists("/tmp/idfusion_escape_abs") and not os.path.exists("/tmp/idfusion_escape_abs_00001.safetensors")
    assert [p for p in new if "escape" in p] == [], "a hostile name reached a file name"
    # the pack's own folders (others may write there meanwhile, so only look for the hostile names)
    assert [p for p in _files(ROOT + "/models") | _files(ROOT + "/nodes") if "escape" in p] == []
    assert [p for p in _files(base) if any(ord(c) < 32 or ord(c) == 127 for c in os.path.basename(p))] == []
    # and a good name still works, in its folder
    out = server.wait(server.queue(save_identity("ok name-1")), timeout=300)
    assert os.path.isfile(os.path.join(ids, "ok name-1_00001.safetensors")), out
