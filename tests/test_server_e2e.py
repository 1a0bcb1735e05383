"""End to end through a REAL ComfyUI server: main.py --cpu in a temporary base directory with this pack
linked into its custom_nodes, a random-weight SD1.5 checkpoint, and workflows/idfusion_basic_api.json
queued over HTTP. Works on either pinned host: ComfyUI from COMFYUI_PATH (see conftest.py), the server
runs under this Python (the host's venv)."""
import copy
import os
import shutil
import sys

import pytest
from PIL import Image

import comfy_server  # scripts/ is on sys.path (conftest.py)
from conftest import COMFYUI, ROOT

pytestmark = pytest.mark.e2e

WORKFLOW = os.path.join(ROOT, "workflows", "idfusion_basic_api.json")
REFERENCE = os.path.join(ROOT, "workflows", "assets", "reference_face.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_checkpoint):
    base = tmp_path_factory.mktemp("comfy_base")
    os.makedirs(base / "input")
    os.makedirs(base / "models" / "checkpoints")
    shutil.copyfile(REFERENCE, base / "input" / "idfusion_reference.png")
    os.symlink(random_checkpoint, base / "models" / "checkpoints" / "random_sd15.safetensors")
    srv = comfy_server.ComfyServer(COMFYUI, str(base), python=sys.executable)
    srv.launch()
    try:
        srv.wait_ready(timeout=240)
        yield srv
    finally:
        srv.stop()


def test_pack_nodes_registered(server):
    expected = set(sys.modules["idfusion_pack"].NODE_CLASS_MAPPINGS)
    assert expected, "the pack registers no nodes"
    info = server.object_info()
    assert expected <= set(info), f"missing in /object_info: {sorted(expected - set(info))}"
    for name in expected:  # loaded from the linked pack, not from somewhere else
        assert info[name]["python_module"] == "custom_nodes.ComfyUI-IDFusion", info[name]["python_module"]
    assert set(comfy_server.pack_node_names()) == expected


def test_basic_workflow_writes_image(server):
    images = server.run(comfy_server.load_workflow(WORKFLOW), timeout=300)
    assert len(images) == 1, images
    path = images[0]
    assert os.path.dirname(path) == server.dir("output")
    assert os.path.basename(path).startswith("IDFusion_demo") and path.endswith(".png")
    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (64, 64)
    assert os.listdir(server.dir("output")) == [os.path.basename(path)]


def test_validation_error_is_reported(server):
    prompt = comfy_server.load_workflow(WORKFLOW)
    prompt["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(comfy_server.ComfyServerError, match="ckpt_name"):
        server.queue(prompt)


def test_node_exception_is_reported(server):
    """The pack's own error (start_at >= end_at) comes back with the node and the server's traceback.
    The loader/adapter/encoding outputs are cached from the previous run, so this fails fast."""
    prompt = copy.deepcopy(comfy_server.load_workflow(WORKFLOW))
    prompt["5"]["inputs"].update(start_at=0.8, end_at=0.2)
    with pytest.raises(comfy_server.ComfyServerError) as e:
        server.run(prompt, timeout=300)
    msg = str(e.value)
    print(msg)
    assert "node 5 (IDFusionApply)" in msg and "ValueError" in msg and "must be smaller than end_at" in msg, msg
    assert "apply_nodes.py" in msg, msg  # the server's traceback is passed on


def test_multi_identity_workflow_writes_image(server):
    """Two identities placed left/right with masks built from ComfyUI's own mask nodes."""
    wf = comfy_server.load_workflow(os.path.join(ROOT, "workflows", "idfusion_multi_identity_api.json"))
    images = server.run(wf, timeout=300)
    assert len(images) == 1 and os.path.basename(images[0]).startswith("IDFusion_multi")
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)


def test_face_repaint_workflow_repaints_only_the_face(server):
    """Face tooling over HTTP: Haar detection on a real photo (scikit-image's astronaut), crop with context,
    masked re-sampling with the identity, stitch back. Outside the repainted box the photo is unchanged."""
    import numpy as np
    from skimage import data
    Image.fromarray(data.astronaut()).save(os.path.join(server.dir("input"), "astronaut.png"))
    wf = comfy_server.load_workflow(os.path.join(ROOT, "workflows", "idfusion_face_repaint_api.json"))
    wf["19"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
    wf["12"]["inputs"].update(image=["19", 0], size=64, no_face="error")   # a face must be found
    wf["15"]["inputs"].update(steps=2)
    images = server.run(wf, timeout=300)
    assert len(images) == 1
    with Image.open(images[0]) as im:
        out = np.asarray(im.convert("RGB")).astype(int)
    src = data.astronaut().astype(int)
    assert out.shape == src.shape
    changed = np.argwhere(np.abs(out - src).sum(-1) > 0)
    assert len(changed) > 0, "nothing was repainted"
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert (y1 - y0) * (x1 - x0) < 0.4 * src.shape[0] * src.shape[1], "the repaint spilled beyond the face"
