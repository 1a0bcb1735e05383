"""Build the UI-format example workflows (workflows/*.json, what the Templates browser lists and artists drag in)
from their API-format twins (workflows/api/*_api.json) in the real frontend, so both describe the same graph.

For each workflow: the twin is loaded with app.loadApiJson (node ids and titles kept), seeds are set to `fixed`,
nodes are laid out stage by stage (one group and one Note per stage, no overlaps), and the graph the frontend
serialises is written. tests/test_browser_workflows.py checks that app.graphToPrompt() of each file equals its twin.

    .hosts/0.3.75/venv/bin/python scripts/build_ui_workflows.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_server  # noqa: E402
import ui_browser  # noqa: E402

ROOT = comfy_server.ROOT
WORKFLOWS = os.path.join(ROOT, "workflows")
GAP = 40            # between nodes, columns and groups
TITLE = 30          # LiteGraph's node title bar, drawn above node.pos
GROUP_HEAD = 46     # a group's title band
PAD = 20
NOTE_W = 340
COLORS = ["#3f789e", "#8A8", "#b58b2a", "#a1309b", "#88A", "#b06634", "#444"]
# nodes whose drawn content (image previews) grows after a run: give them room up front
MIN_SIZE = {"LoadImage": (320, 380), "SaveImage": (320, 360), "PreviewImage": (320, 360),
            "CLIPTextEncode": (380, 170), "IDFusionEncodeReference": (340, 330), "IDFusionFaceMasks": (340, 380),
            "IDFusionApplyMultiIdentity": (340, 560), "IDFusionFaceEvaluate": (380, 300), "IDFusionTrainAdapter": (400, 820),
            "IDFusionLoadIdentity": (340, 330)}

CKPT_NOTE = ("Set ckpt_name to your SD1.5 or SDXL checkpoint. No public IDFusion adapter exists yet: IDFusion New "
             "Adapter (untrained) makes a correctly shaped one so the graph runs (its pictures are noise); replace it "
             "with IDFusion Load Adapter once you have trained one (see the training template).")

# name -> twin, rows of stages: (title, note, [columns of API node ids])
SPECS = {
    "idfusion_basic": {
        "twin": "idfusion_basic_api.json",
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Reference face", "One or more photos of ONE person (a batch = several references). The reference goes "
             "once through the model's own UNet; its hidden states h_f at every cross-attention layer are the identity. "
             "Aligned face crops work best.", [["3"], ["4"]]),
            ("3. Fuse the identity", "IDFusion Apply adds K_f/V_f from the adapter to every cross-attention layer: "
             "K' = [K_text; K_f]. weight scales V_f (0 = off); start_at/end_at limit when it acts.", [["5"]]),
        ], [
            ("4. Prompt and sample", "Describe the scene; the identity comes from the reference, not from the words. "
             "The seed is fixed so the example repeats; set control_after_generate to randomize to explore.",
             [["6", "7"], ["8", "9"]]),
            ("5. Decode and save", "The picture is written to ComfyUI/output/IDFusion_demo_*.png.", [["10"], ["11"]]),
        ]],
    },
    "idfusion_multi_identity": {
        "twin": "idfusion_multi_identity_api.json",
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Two identities", "Encode each person separately. Person 2 here is the demo face flipped, a stand-in: "
             "load a photo of someone else.", [["3", "12"], ["4", "13"]]),
            ("3. Where each face goes", "One mask per identity, in identity order (mask 1 = person 1). Built with "
             "ComfyUI's own mask nodes: left and right halves. IDFusion Face Masks can make them from a layout photo.",
             [["14", "15"], ["16", "17"], ["18"]]),
        ], [
            ("4. Fuse both identities", "Inside person j's region the other identities' keys are masked out (Eq. 7), "
             "so faces do not morph into each other. After a run the node shows each region in its colour.", [["5"]]),
            ("5. Prompt and sample", "Ask for as many people as you placed. Fixed seed.", [["6", "7"], ["8", "9"]]),
            ("6. Decode and save", "Written to ComfyUI/output/IDFusion_multi_*.png.", [["10"], ["11"]]),
        ]],
    },
    "idfusion_face_repaint": {
        "twin": "idfusion_face_repaint_api.json",
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Reference face", "The person to keep. Encoded once, used by both stages.", [["3"], ["4"]]),
            ("3. Fuse the identity", "One patched model for both samplers.", [["5"]]),
            ("4. Stage 1: the whole picture", "A normal generation with the identity. Fixed seed.",
             [["6", "7"], ["8", "9"], ["10"]]),
        ], [
            ("5. Stage 2: find and crop the face", "The face is found (Haar needs no model files; antelopev2 is "
             "better), cropped with context and given a feathered mask.", [["11"], ["12"]]),
            ("6. Stage 2: repaint the face", "Only the masked face is re-sampled at higher resolution with the same "
             "identity (denoise 0.5), then blended back: outside the band the picture is unchanged.",
             [["13", "14"], ["15"], ["16", "17"]]),
            ("7. Save", "Written to ComfyUI/output/IDFusion_face_repaint_*.png.", [["18"]]),
        ]],
    },
    "idfusion_face_benchmark": {
        "twin": "idfusion_face_benchmark_api.json",
        "rows": [[
            ("1. Models", "Set ckpt_name and adapter_name to yours. scripts/face_benchmark.py fills the nodes titled "
             "'reference', 'prompt' and 'seed'; keep those titles.", [["1", "2"]]),
            ("2. Reference face", "The photo to compare against, cropped and aligned by the face analysis (ArcFace: "
             "antelopev2 or buffalo_l in models/insightface).", [["3", "4"], ["5"], ["6"]]),
            ("3. Fuse the identity", "The adapter under test.", [["7"]]),
        ], [
            ("4. Prompt and sample", "The benchmark runs every reference x prompt x seed through this graph.",
             [["8", "9"], ["10", "11"]]),
            ("5. Decode and save", "The benchmark fetches the picture from this Save Image (the one fed by the same IMAGE as 'Face Evaluate').", [["12"], ["13"]]),
            ("6. Score", "ArcFace similarity and distance (1 - cos) to the reference, face SSIM/PSNR. After a run the "
             "node shows a badge per image: similarity, distance, face found.", [["14"]]),
        ]],
    },
    "idfusion_training": {
        "twin": "idfusion_training_api.json",
        "rows": [[
            ("1. Base model", "Training needs the model you will sample with (frozen). This example uses the pack's "
             "own tiny synthetic-faces model so it runs on a CPU in seconds; use your checkpoint's MODEL/CLIP/VAE.",
             [["1"]]),
            ("2. Train the adapter", "Only Linear_kf/Linear_vf train. The dataset is a folder in "
             "ComfyUI/input/idfusion_datasets/ (images + .txt captions, identity subfolders). Writes "
             "models/idfusion/<adapter_name>.safetensors; Cancel keeps the last checkpoint and queueing again "
             "resumes. The node draws the loss live.", [["2"]]),
            ("3. Loss curve", "The loss per step, also saved in models/idfusion/training/.", [["3"]]),
        ]],
    },
    "idfusion_synthetic_demo": {
        "twin": "idfusion_synthetic_demo_api.json",
        "rows": [[
            ("1. The shipped model and adapter", "Everything here ships with the pack: a tiny cartoon-faces model trained "
             "on CPU and an adapter trained for it, so you can see identity transfer without downloading anything. "
             "Captions use its small vocabulary, e.g. 'a photo of a person, crying, facing left, teal background'.",
             [["1", "2"]]),
            ("2. Reference face", "Put a reference from workflows/assets/synthetic/ in ComfyUI/input (unseen_0.png is a "
             "person the adapter never saw in training). After a run the node shows its thumbnail.", [["3"], ["4"]]),
            ("3. Fuse the identity", "The same Apply node you would use with a real checkpoint.", [["5"]]),
        ], [
            ("4. Prompt", "Describe only expression, pose and background: who it is comes from the reference.",
             [["6", "7"], ["8"]]),
            ("5. With the identity", "Fixed seed 1.", [["9"], ["10", "11"]]),
            ("6. Same seed, without the identity", "The plain model with the same prompt and seed, to compare: only "
             "the face's identity should differ.", [["12"], ["13", "14"]]),
        ]],
    },
    "idfusion_synthetic_two_identities": {
        "twin": "idfusion_synthetic_two_identities_api.json",
        "rows": [[
            ("1. The shipped model and adapter", "The pack's tiny cartoon-faces model and its adapter (no downloads).",
             [["1", "2"]]),
            ("2. Two people", "Two references from workflows/assets/synthetic/ in ComfyUI/input, one per person.",
             [["3", "5"], ["4", "6"]]),
            ("3. Where each face goes", "Left and right halves of a 128 x 64 picture, one mask per identity in "
             "identity order.", [["7", "8"], ["9", "10"], ["11"]]),
        ], [
            ("4. Fuse both identities", "Inside each region the other person's keys are masked out (Eq. 7). After a "
             "run the node shows each identity's region in its colour.", [["12"]]),
            ("5. Prompt and sample", "'two people, ...' from the model's vocabulary. Fixed seed.", [["13", "14"], ["15", "16"]]),
            ("6. Decode and save", "Written to ComfyUI/output/idfusion_demo/.", [["17"], ["18"]]),
        ]],
    },
}


def stage_layout(title, note, columns, sizes, x, y, color):
    """Place one stage at (x, y): a group, a Note across its top, then the node columns. Returns (nodes' pos by id,
    note dict, group dict, width, height)."""
    col_w = [max(sizes[i][0] for i in col) for col in columns]
    inner_w = max(sum(col_w) + GAP * (len(columns) - 1), NOTE_W)
    note_h = 60 + 18 * (len(note) // max(20, inner_w // 7)) if note else 0
    top = y + GROUP_HEAD + TITLE
    pos = {}
    if note:
        top += note_h + GAP + TITLE
    cx, bottom = x + PAD, top
    for col, w in zip(columns, col_w):
        cy = top
        for i in col:
            pos[i] = [cx, cy]
            cy += sizes[i][1] + GAP + TITLE
        bottom = max(bottom, cy - GAP - TITLE)
        cx += w + GAP
    width = inner_w + 2 * PAD
    height = bottom - y + PAD
    group = {"title": title, "bounding": [x, y, width, height], "color": color, "font_size": 24, "flags": {}}
    note_node = {"type": "Note", "pos": [x + PAD, y + GROUP_HEAD + TITLE], "size": [inner_w, note_h], "flags": {},
                 "mode": 0, "properties": {}, "widgets_values": [note], "title": f"Note: {title}"} if note else None
    return pos, note_node, group, width, height


def layout(graph, spec, sizes):
    """Positions, groups and Notes for the API-loaded graph; sizes by node id."""
    nodes = {str(n["id"]): n for n in graph["nodes"]}
    for i, n in nodes.items():
        n["size"] = list(sizes[i])
    groups, notes = [], []
    y, k = 0, 0
    for row in spec["rows"]:
        x, row_h = 0, 0
        for title, note, columns in row:
            pos, note_node, group, w, h = stage_layout(title, note, columns, sizes, x, y, COLORS[k % len(COLORS)])
            for i, p in pos.items():
                nodes[i]["pos"] = p
            groups.append(group)
            if note_node:
                notes.append(note_node)
            x += w + GAP
            row_h = max(row_h, h)
            k += 1
        y += row_h + GAP + 20
    next_id = max(int(i) for i in nodes) + 1
    for n in notes:
        n.update(id=next_id, order=next_id)
        graph["nodes"].append(n)
        next_id += 1
    graph["last_node_id"] = next_id - 1
    graph["groups"] = groups
    graph.setdefault("extra", {})["ds"] = {"scale": 0.6, "offset": [40, 40]}
    return graph


def build(page, name, spec) -> dict:
    with open(os.path.join(WORKFLOWS, "api", spec["twin"])) as f:
        api = json.load(f)
    ui_browser.load_api(page, api, name)
    # fixed seeds: every seed widget's "control after generate" (new graphs default to randomize)
    page.evaluate("""() => { for (const n of app.graph._nodes) for (const w of n.widgets || [])
        if (w.name === 'control_after_generate') w.value = 'fixed'; }""")
    base = ui_browser.serialize(page)
    placed = [i for row in spec["rows"] for _, _, cols in row for col in cols for i in col]
    missing = {str(n["id"]) for n in base["nodes"]} - set(placed)
    if missing or len(placed) != len(set(placed)):
        raise SystemExit(f"{name}: layout must place every node once; unplaced {sorted(missing)}")
    sizes = {}
    for n in base["nodes"]:
        w, h = MIN_SIZE.get(n["type"], (0, 0))
        sizes[str(n["id"])] = [math.ceil(max(n["size"][0], w, 300)), math.ceil(max(n["size"][1], h))]
    # the frontend may widen a node on load (long titles, DOM widgets): lay out again with the sizes it settles on
    for _ in range(4):
        graph = layout(json.loads(json.dumps(base)), spec, sizes)
        ui_browser.load_ui(page, graph, name)
        out = ui_browser.serialize(page)
        grown = {str(n["id"]): n["size"] for n in out["nodes"] if str(n["id"]) in sizes
                 and (n["size"][0] > sizes[str(n["id"])][0] + 0.5 or n["size"][1] > sizes[str(n["id"])][1] + 0.5)}
        if not grown:
            break
        for i, (w, h) in grown.items():
            sizes[i] = [math.ceil(max(sizes[i][0], w)), math.ceil(max(sizes[i][1], h))]
    else:
        raise SystemExit(f"{name}: node sizes did not settle: {grown}")
    out.pop("id", None)  # a random workflow id per save; a template does not need one
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="workflow names (default: all)")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args(argv)
    names = a.only or list(SPECS)
    with tempfile.TemporaryDirectory(prefix="idfusion_ui_build_") as base:
        ui_browser.seed_user_settings(base)
        with comfy_server.ComfyServer(a.comfyui, base) as server, ui_browser.Browser() as browser:
            page = browser.open(server.url)
            for name in names:
                graph = build(page, name, SPECS[name])
                path = os.path.join(WORKFLOWS, f"{name}.json")
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(graph, f, indent=1)
                    f.write("\n")
                os.replace(tmp, path)
                print(path)


if __name__ == "__main__":
    main()
