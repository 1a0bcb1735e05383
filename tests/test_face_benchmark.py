"""scripts/face_benchmark.py without a server: the shipped workflow's markers and nodes, and the errors a user gets
for bad inputs before anything is queued. The run over HTTP is in test_server_e2e.py (it reuses that server)."""
import json
import os

import pytest

import comfy_server  # scripts/ is on sys.path (conftest.py)
import face_benchmark
from conftest import ROOT

WORKFLOW = os.path.join(ROOT, "workflows", "api", "idfusion_face_benchmark_api.json")


@pytest.fixture
def inputs(tmp_path):
    """A faces folder with one photo, a prompt file, a copy of the shipped workflow, and an address nobody serves."""
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "me.png").write_bytes(open(os.path.join(ROOT, "workflows", "assets", "reference_face.png"), "rb").read())
    (tmp_path / "prompts.txt").write_text("a photo of a person\n")
    wf = tmp_path / "workflow.json"
    wf.write_text(open(WORKFLOW).read())
    nobody = f"http://127.0.0.1:{comfy_server.free_port()}"
    return dict(faces=faces, prompts=tmp_path / "prompts.txt", workflow=wf, out=tmp_path / "out", url=nobody)


def bench(capsys, **kw):
    argv = []
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    rc = face_benchmark.main(argv)
    return rc, capsys.readouterr().err


def test_shipped_workflow_has_the_markers_and_known_nodes():
    import idfusion_pack
    import nodes as comfy_nodes
    wf = comfy_server.load_workflow(WORKFLOW)
    marks = face_benchmark.marked_inputs(wf, WORKFLOW)
    assert {m: [(wf[n]["class_type"], i) for n, i in v] for m, v in marks.items()} == {
        "reference": [("LoadImage", "image")], "prompt": [("CLIPTextEncode", "text")], "seed": [("KSampler", "seed")]}
    scorer, saver = face_benchmark.scorer_and_saver(wf, WORKFLOW)
    assert wf[scorer]["class_type"] == "IDFusionFaceEvaluate" and wf[saver]["class_type"] == "SaveImage"
    known = {**comfy_nodes.NODE_CLASS_MAPPINGS, **idfusion_pack.NODE_CLASS_MAPPINGS}
    for nid, n in wf.items():
        spec = known[n["class_type"]].INPUT_TYPES()
        assert set(n["inputs"]) <= {*spec["required"], *spec.get("optional", {})}, nid
        assert set(spec["required"]) <= set(n["inputs"]), nid
        assert all(v[0] in wf for v in n["inputs"].values() if isinstance(v, list)), nid


def test_missing_marker_says_which_title_to_set(inputs, capsys):
    wf = json.loads(inputs["workflow"].read_text())
    wf["3"]["_meta"]["title"] = "Reference face"
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)   # fails on the workflow before it looks for the (absent) server
    assert rc == 2
    assert "no node is titled 'reference'" in err and "Title the LoadImage of the reference photo 'reference'" in err, err
    assert not inputs["out"].exists()


def test_doubled_marker_and_missing_scorer(inputs, capsys):
    wf = json.loads(inputs["workflow"].read_text())
    wf["9"]["_meta"]["title"] = "Prompt"
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)
    assert rc == 2 and "nodes 8, 9 are all titled 'prompt'" in err, err
    wf["9"]["_meta"]["title"] = "negative"
    del wf["14"]
    inputs["workflow"].write_text(json.dumps(wf))
    rc, err = bench(capsys, **inputs)
    assert rc == 2 and "needs exactly one IDFusionFaceEvaluate node" in err, err


def test_bad_inputs_are_named(inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    rc, err = bench(capsys, **{**inputs, "faces": empty})
    assert rc == 2 and "has no reference images" in err, err

    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n   \n")
    rc, err = bench(capsys, **{**inputs, "prompts": comments})
    assert rc == 2 and "has no prompts" in err, err

    ui_format = tmp_path / "ui.json"
    ui_format.write_text(json.dumps({"last_node_id": 3, "nodes": [{"id": 1, "type": "LoadImage"}], "links": []}))
    rc, err = bench(capsys, **{**inputs, "workflow": ui_format})
    assert rc == 2 and "is not an API-format workflow (export it with 'Save (API)')" in err, err

    rc, err = bench(capsys, **inputs)   # all inputs fine, nobody at the address
    assert rc == 2 and f"Cannot reach ComfyUI at {inputs['url']}" in err and "--base DIR" in err, err
