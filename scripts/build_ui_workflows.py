"""Build the UI-format example workflows (workflows/*.json, what the Templates browser lists and artists drag in)
from their API-format twins (workflows/api/*_api.json) in the real frontend, so both describe the same graph, and
their thumbnails (workflows/<template>.jpg, where frontend 1.32.9 looks for a custom node's template thumbnail).

For each workflow: the twin gets this script's input values (REFERENCE, CKPT, ...: each file name in one place) and is
loaded with app.loadApiJson (node ids and titles kept), seeds are set to `fixed`, nodes are laid out stage by stage
(one group and one Note per stage, no overlaps), and the graph the frontend serialises is written. Then the template
is run as shipped when it can run (the synthetic model's templates) and its screenshot, with a one-line description,
becomes the thumbnail; the demo's full-page screenshot goes to docs/screens/demo_template_ui.png (README).
tests/test_browser_workflows.py checks that app.graphToPrompt() of each file equals its twin.

    .hosts/0.3.75/venv/bin/python scripts/build_ui_workflows.py [--only NAME-OR-NUMBER ...] [--no-thumbnails]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter_settings  # noqa: E402
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
MIN_SIZE = {"LoadImage": (320, 380), "IDFusionExampleReference": (320, 380), "SaveImage": (320, 360), "PreviewImage": (320, 360),
            "CLIPTextEncode": (380, 170), "IDFusionEncodeReference": (340, 330), "IDFusionFaceMasks": (340, 380),
            "IDFusionApplyMultiIdentity": (340, 560), "IDFusionFaceEvaluate": (380, 300), "IDFusionTrainAdapter": (400, 920),
            "IDFusionLoadIdentity": (340, 330)}

# The inputs a template names, each in ONE place: the twins (workflows/api/) are rewritten with these values before the
# UI files are built from them. Every file named here ships with the pack or with a stock ComfyUI, except the user's own
# checkpoint / adapter, which the templates name by their usual file names and whose Notes say where they come from.
REFERENCE = "fresh_0.png"             # a shipped face the synthetic adapter never saw (IDFusion Example Reference Face)
REFERENCE_2 = "fresh_1.png"           # the second person of the two-people template
SD_REFERENCE = "reference_face.png"   # the pack's cartoon face, for SD checkpoints (workflows/assets/)


def recommended(adapter: str = "synthetic_faces_adapter.safetensors") -> dict:
    """The sampling settings a shipped synthetic adapter's metadata recommends (chosen by `make synthetic` on
    validation identities): {"cfg", "uncond", "weight", "end_at"}. adapter: its file in models/idfusion/."""
    try:
        return adapter_settings.recommended(os.path.join(ROOT, "models", "idfusion", adapter))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def synthetic_demo_values(adapter: str) -> dict:
    """The demo twins' (1 and 9: same node ids) settings, read off the shipped adapter's metadata when the twin is built."""
    rec = recommended(adapter)
    return {"3": {"image": REFERENCE}, "8": {"width": FACE, "height": FACE},
            "5": {"weight": rec["weight"], "uncond": rec["uncond"], "end_at": rec["end_at"]},
            "15": {"uncond": rec["uncond"], "end_at": rec["end_at"]},
            "9": {"cfg": rec["cfg"]}, "12": {"cfg": rec["cfg"]}}


REC = recommended()
DATASET = "example_synthetic_faces"   # workflows/assets/datasets/ (scripts/make_example_dataset.py)
CKPT = "v1-5-pruned-emaonly.safetensors"
ADAPTER = "idfusion_adapter.safetensors"
FACE = 96                             # the synthetic model's picture: FACE x FACE, two people 2*FACE x FACE
FLUX_SYNTHETIC = "synthetic_faces_flux.safetensors"              # the pack's tiny DiT (models/)
FLUX_SYNTHETIC_ADAPTER = "synthetic_faces_flux_adapter.safetensors"  # its adapter (models/idfusion/)
# a user's Flux, by the usual file names of ComfyUI's Flux examples
FLUX_UNET = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
FLUX_ADAPTER = "idfusion_flux_adapter.safetensors"
# what a template that does not run as shipped needs from the user: (input, usual file name, ComfyUI/models/ folder)
NEEDS_CKPT = [("ckpt_name", CKPT, "checkpoints")]
NEEDS_FLUX = [("unet_name", FLUX_UNET, "diffusion_models"), ("clip_name1", FLUX_CLIP_L, "text_encoders"),
              ("clip_name2", FLUX_T5, "text_encoders"), ("vae_name", FLUX_VAE, "vae"), ("adapter_name", FLUX_ADAPTER, "idfusion")]
USER_FILES = {CKPT, ADAPTER} | {f for _, f, _ in NEEDS_FLUX}  # the user's own files, named by their usual names

CKPT_NOTE = (f"Needs your SD1.5 checkpoint in ComfyUI/models/checkpoints/. ckpt_name is set to {CKPT}, its usual name "
             "(Stable Diffusion 1.5 from Hugging Face: stable-diffusion-v1-5/stable-diffusion-v1-5, or the fp16 "
             "v1-5-pruned-emaonly-fp16.safetensors from Comfy-Org/stable-diffusion-v1-5-archive); pick yours from the "
             "list. No public IDFusion adapter exists yet: IDFusion New Adapter (untrained) makes a correctly shaped one "
             "so the graph runs (its pictures are noise); replace it with IDFusion Load Adapter once you have trained "
             "one (template 3).")
FLUX_NOTE = (f"Needs your Flux files (their usual names; pick yours from each list): {FLUX_UNET} in "
             "ComfyUI/models/diffusion_models/ (FLUX.1 [dev] from Hugging Face: black-forest-labs/FLUX.1-dev; schnell "
             "works the same: flux1-schnell.safetensors, 4 steps), "
             f"{FLUX_CLIP_L} and {FLUX_T5} (or t5xxl_fp8_e4m3fn.safetensors) in ComfyUI/models/text_encoders/ (Hugging "
             f"Face: comfyanonymous/flux_text_encoders), {FLUX_VAE} in ComfyUI/models/vae/ (from the FLUX.1 repository). "
             "weight_dtype fp8_e4m3fn halves the model's memory. IDFusion on Flux needs ComfyUI 0.3.75 or newer.")
FLUX_ADAPTER_NOTE = (f"adapter_name: an IDFusion adapter trained for this Flux, {FLUX_ADAPTER} in ComfyUI/models/idfusion/. "
                     "No public one exists yet: train it with scripts/train.py --unet (this model) --clip (both text "
                     "encoders) --vae, or with template 3 on these loaders' MODEL/CLIP/VAE. To try the wiring first, "
                     "IDFusion New Adapter (untrained) makes a correctly shaped one (its pictures are noise).")
REF_NOTE = ("The reference is the pack's cartoon face (IDFusion Example Reference Face, nothing to copy). For a real "
            "person replace it with Load Image and a photo of ONE person (a batch = several references).")

# UI file name (the title the Templates browser shows: frontend 1.32.9 has no other title or description for a custom
# node's template, so the name says what it is and the numbers give the order) -> twin, one-line description (drawn on
# the thumbnail), whether it runs as shipped (then the thumbnail shows a finished run), twin values, rows of stages:
# (title, note, [columns of API node ids])
SPECS = {
    "1 Start here - identity demo": {
        "twin": "idfusion_synthetic_demo_api.json",
        "describe": "Start here: identity transfer on the pack's own tiny model. Runs as shipped, no downloads.",
        "runs": True,
        "values": lambda: synthetic_demo_values("synthetic_faces_adapter.safetensors"),
        "rows": [[
            ("1. The shipped model and adapter", "Everything here ships with the pack: a tiny cartoon-faces model trained "
             "on CPU and an adapter trained for it, so you can see identity transfer without downloading anything: "
             "press Run. Captions use its small vocabulary, e.g. 'a photo of a person, crying, facing left, teal "
             "background'.", [["1", "2"]]),
            ("2. Reference face", f"A face that ships with the pack ({REFERENCE}: a person the adapter never saw in "
             "training). Pick another in the list; nothing needs copying into ComfyUI/input. After a run the node shows "
             "its thumbnail.", [["3"], ["4"]]),
            ("3. Fuse the identity", "The same Apply node you would use with a real checkpoint.", [["5"]]),
        ], [
            ("4. Prompt", "Describe only expression, pose and background: who it is comes from the reference.",
             [["6", "7"], ["8"]]),
            ("5. With the identity", "Fixed seed 1.", [["9"], ["10", "11"]]),
            ("6. Same seed, without the identity", "The same Apply with weight 0 returns the plain model, so this "
             "picture shows what the model draws without the identity. Both pictures depend on the reference: if it is "
             "missing, the whole prompt stops with an error instead of half-running.", [["15", "12"], ["13", "14"]]),
        ]],
    },
    "2 Two people, two identities": {
        "twin": "idfusion_synthetic_two_identities_api.json",
        "describe": "Two identities in one picture, each kept to its region by masks. Runs as shipped.",
        "runs": True,
        "values": {"3": {"image": REFERENCE}, "5": {"image": REFERENCE_2}, "7": {"width": 2 * FACE, "height": FACE},
                   "8": {"width": FACE, "height": FACE}, "10": {"x": FACE}, "15": {"width": 2 * FACE, "height": FACE},
                   "12": {"weight": REC["weight"], "uncond": REC["uncond"], "end_at": REC["end_at"]},
                   "16": {"cfg": REC["cfg"]}},
        "rows": [[
            ("1. The shipped model and adapter", "The pack's tiny cartoon-faces model and its adapter (no downloads).",
             [["1", "2"]]),
            ("2. Two people", "Two faces that ship with the pack (IDFusion Example Reference Face), one per person.",
             [["3", "5"], ["4", "6"]]),
            ("3. Where each face goes", f"Left and right halves of a {2 * FACE} x {FACE} picture, one mask per "
             "identity in identity order.", [["7", "8"], ["9", "10"], ["11"]]),
        ], [
            ("4. Fuse both identities", "Inside each region the other person's keys are masked out (Eq. 7). After a "
             "run the node shows each identity's region in its colour.", [["12"]]),
            ("5. Prompt and sample", "'two people, ...' from the model's vocabulary. Fixed seed.", [["13", "14"], ["15", "16"]]),
            ("6. Decode and save", "Written to ComfyUI/output/idfusion_demo/.", [["17"], ["18"]]),
        ]],
    },
    "3 Train an adapter": {
        "twin": "idfusion_training_api.json",
        "describe": "Train an IDFusion adapter: 20 steps on the shipped example dataset, with a live loss chart.",
        "runs": True,
        "values": {"2": {"dataset": DATASET}},
        "rows": [[
            ("1. Base model", "Training needs the model you will sample with (frozen). This example uses the pack's "
             "own tiny synthetic-faces model so it runs on a CPU in seconds; use your checkpoint's MODEL/CLIP/VAE.",
             [["1"]]),
            ("2. Train the adapter", f"Only Linear_kf/Linear_vf train. {DATASET} ships with the pack (2 people x 4 "
             "pictures); your own dataset is a folder in ComfyUI/input/idfusion_datasets/ (images + .txt captions, one "
             "subfolder per person). Writes models/idfusion/<adapter_name>.safetensors; Cancel keeps the last "
             "checkpoint and queueing again resumes. The node draws the loss live.", [["2"]]),
            ("3. Loss curve", "The loss per step, also saved in models/idfusion/training/.", [["3"]]),
        ]],
    },
    "4 SD1.5 - one identity": {
        "twin": "idfusion_basic_api.json",
        "describe": f"One identity on your SD1.5 checkpoint ({CKPT}).",
        "needs": NEEDS_CKPT,
        "values": {"1": {"ckpt_name": CKPT}, "3": {"image": SD_REFERENCE}},
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Reference face", REF_NOTE + " The reference goes once through the model's own UNet; its hidden states "
             "h_f at every cross-attention layer are the identity.", [["3"], ["4"]]),
            ("3. Fuse the identity", "IDFusion Apply adds K_f/V_f from the adapter to every cross-attention layer: "
             "K' = [K_text; K_f]. weight scales V_f (0 = off); start_at/end_at limit when it acts.", [["5"]]),
        ], [
            ("4. Prompt and sample", "Describe the scene; the identity comes from the reference, not from the words. "
             "The seed is fixed so the example repeats; set control_after_generate to randomize to explore. The size "
             "and steps are a quick check: use 512 x 512 and 20 steps for a real picture.",
             [["6", "7"], ["8", "9"]]),
            ("5. Decode and save", "The picture is written to ComfyUI/output/IDFusion_demo_*.png.", [["10"], ["11"]]),
        ]],
    },
    "5 SD1.5 - two people, masks": {
        "twin": "idfusion_multi_identity_api.json",
        "describe": f"Two people placed with masks on your SD1.5 checkpoint ({CKPT}).",
        "needs": NEEDS_CKPT,
        "values": {"1": {"ckpt_name": CKPT}, "3": {"image": SD_REFERENCE}},
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Two identities", "Encode each person separately. " + REF_NOTE + " Person 2 here is the same face "
             "flipped, a stand-in: load a photo of someone else.", [["3", "12"], ["4", "13"]]),
            ("3. Where each face goes", "One mask per identity, in identity order (mask 1 = person 1). Built with "
             "ComfyUI's own mask nodes: left and right halves. IDFusion Face Masks can make them from a layout photo.",
             [["14", "15"], ["16", "17"], ["18"]]),
        ], [
            ("4. Fuse both identities", "Inside person j's region the other identities' keys are masked out (Eq. 7), "
             "so faces do not morph into each other. After a run the node shows each region in its colour.", [["5"]]),
            ("5. Prompt and sample", "Ask for as many people as you placed. Fixed seed. The size and steps are a quick "
             "check: use 512 x 512 (and masks of that size) and 20 steps for a real picture.", [["6", "7"], ["8", "9"]]),
            ("6. Decode and save", "Written to ComfyUI/output/IDFusion_multi_*.png.", [["10"], ["11"]]),
        ]],
    },
    "6 SD1.5 - face repaint": {
        "twin": "idfusion_face_repaint_api.json",
        "describe": f"Generate, then repaint the face at higher resolution with the identity ({CKPT}).",
        "needs": NEEDS_CKPT,
        "values": {"1": {"ckpt_name": CKPT}, "3": {"image": SD_REFERENCE}},
        "rows": [[
            ("1. Models", CKPT_NOTE, [["1", "2"]]),
            ("2. Reference face", "The person to keep, encoded once and used by both stages. " + REF_NOTE,
             [["3"], ["4"]]),
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
    "7 Face benchmark (ArcFace)": {
        "twin": "idfusion_face_benchmark_api.json",
        "describe": "Score an adapter: ArcFace similarity to the reference (scripts/face_benchmark.py runs it at scale).",
        "needs": NEEDS_CKPT + [("adapter_name", ADAPTER, "idfusion")],
        "values": {"1": {"ckpt_name": CKPT}, "2": {"adapter_name": ADAPTER}, "3": {"image": "example.png"}},
        "rows": [[
            ("1. Models", f"Needs your own files. ckpt_name: your SD1.5 checkpoint in ComfyUI/models/checkpoints/ "
             f"({CKPT}, from Hugging Face: stable-diffusion-v1-5/stable-diffusion-v1-5). adapter_name: the adapter "
             f"you trained for it ({ADAPTER} in ComfyUI/models/idfusion/, written by the training template). "
             "scripts/face_benchmark.py fills the nodes titled 'reference', 'prompt' and 'seed'; keep those titles.",
             [["1", "2"]]),
            ("2. Reference face", "A photo of a real person in ComfyUI/input (example.png is stock ComfyUI's picture, "
             "a placeholder: load your photo). It is cropped and aligned by the face analysis, which needs the ArcFace "
             "models antelopev2 or buffalo_l in ComfyUI/models/insightface (from the insightface project).",
             [["3", "4"], ["5"], ["6"]]),
            ("3. Fuse the identity", "The adapter under test.", [["7"]]),
        ], [
            ("4. Prompt and sample", "The benchmark runs every reference x prompt x seed through this graph.",
             [["8", "9"], ["10", "11"]]),
            ("5. Decode and save", "The benchmark fetches the picture from this Save Image (the one fed by the same IMAGE as 'Face Evaluate').", [["12"], ["13"]]),
            ("6. Score", "ArcFace similarity and distance (1 - cos) to the reference, face SSIM/PSNR. After a run the "
             "node shows a badge per image: similarity, distance, face found.", [["14"]]),
        ]],
    },
    "8 Flux - one identity": {
        "twin": "idfusion_flux_one_identity_api.json",
        "describe": f"One identity on your Flux dev/schnell ({FLUX_UNET} + clip_l + t5xxl + ae).",
        "needs": NEEDS_FLUX,
        "values": {"1": {"unet_name": FLUX_UNET}, "2": {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux", "device": "default"},
                   "3": {"vae_name": FLUX_VAE}, "4": {"adapter_name": FLUX_ADAPTER}, "5": {"image": SD_REFERENCE}},
        "rows": [[
            ("1. Models", FLUX_NOTE + " " + FLUX_ADAPTER_NOTE, [["1", "2"], ["3", "4"]]),
            ("2. Reference face", REF_NOTE + " The reference goes once through the Flux DiT's own blocks; each block's "
             "reference tokens are the identity.", [["5"], ["6"]]),
            ("3. Fuse the identity", "The same IDFusion Apply as on SD1.5/SDXL: on Flux it adds K_f/V_f from the "
             "adapter to every double and single block's joint attention (the image queries attend to text, image "
             "and identity keys). weight scales V_f (0 = off); block_weights takes double:/single: groups.", [["7"]]),
        ], [
            ("4. Prompt and guidance", "Describe the scene; the identity comes from the reference. Flux dev reads its "
             "guidance from FluxGuidance (3.5 is usual) and samples at cfg 1, so the negative is not used.",
             [["8", "10"], ["9", "11"]]),
            ("5. Sample", "Flux dev: euler, simple, 20 steps, cfg 1 (schnell: 4 steps). Fixed seed; set "
             "control_after_generate to randomize to explore.", [["12"]]),
            ("6. Decode and save", "Written to ComfyUI/output/IDFusion_flux_*.png.", [["13"], ["14"]]),
        ]],
    },
    "9 Flux - synthetic DiT identity demo": {
        "twin": "idfusion_synthetic_flux_demo_api.json",
        "describe": "Identity transfer on the pack's own tiny Flux DiT. Runs as shipped, no downloads.",
        "runs": True,
        "values": lambda: dict(synthetic_demo_values(FLUX_SYNTHETIC_ADAPTER), **{
            "1": {"model_name": FLUX_SYNTHETIC}, "2": {"adapter_name": FLUX_SYNTHETIC_ADAPTER}}),
        "rows": [[
            ("1. The shipped DiT and its adapter", "Both ship with the pack: ComfyUI's own Flux class at a tiny width, "
             "trained on CPU on the same cartoon faces and captions as template 1's UNet, and an adapter trained for "
             "it: press Run. The same nodes as on a real Flux; this tiny DiT has no guidance input, so it samples with "
             "cfg like the UNet (the adapter's recommended cfg, weight and uncond are set).", [["1", "2"]]),
            ("2. Reference face", f"A face that ships with the pack ({REFERENCE}: a person the adapter never saw in "
             "training). Pick another in the list; nothing needs copying into ComfyUI/input.", [["3"], ["4"]]),
            ("3. Fuse the identity", "The same Apply node as on the UNet: on this DiT it fuses the identity into every "
             "double and single block's joint attention.", [["5"]]),
        ], [
            ("4. Prompt", "Describe only expression, pose and background: who it is comes from the reference.",
             [["6", "7"], ["8"]]),
            ("5. With the identity", "Fixed seed 1.", [["9"], ["10", "11"]]),
            ("6. Same seed, without the identity", "The same Apply with weight 0 returns the plain model, so this "
             "picture shows what the DiT draws without the identity. Both pictures depend on the reference: if it is "
             "missing, the whole prompt stops with an error instead of half-running.", [["15", "12"], ["13", "14"]]),
        ]],
    },
}
FLUX_DEMO = "9 Flux - synthetic DiT identity demo"


def flux_demo_ships() -> bool:
    """Whether the shipped DiT and its adapter, with the adapter's recommended settings, are in models/."""
    if not os.path.isfile(os.path.join(ROOT, "models", FLUX_SYNTHETIC)):
        return False
    try:
        adapter_settings.recommended(os.path.join(ROOT, "models", "idfusion", FLUX_SYNTHETIC_ADAPTER))
        return True
    except ValueError:
        return False


# A checkout without the shipped DiT and its adapter's recommended settings (before `make synthetic-flux` finished) has no
# DiT demo to build; once they exist, tests/test_browser_workflows.py fails until the template is built (--only 9).
FLUX_DEMO_SPEC = SPECS[FLUX_DEMO] if flux_demo_ships() else SPECS.pop(FLUX_DEMO)
TWIN_TO_UI = {spec["twin"]: name for name, spec in SPECS.items()}


def ui_name(twin_stem: str) -> str:
    """The template (UI file name without .json) of a twin, e.g. 'idfusion_synthetic_demo' -> '1 Start here - ...'."""
    return TWIN_TO_UI[twin_stem + "_api.json"]


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


def write_atomic(path: str, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def twin_with_values(spec) -> dict:
    """The twin with this script's values (REFERENCE, CKPT, ...) filled in; written back if they changed, so the twin
    and the UI file always name the same files."""
    path = os.path.join(WORKFLOWS, "api", spec["twin"])
    with open(path) as f:
        text = f.read()
    api = json.loads(text)
    values = spec.get("values", {})
    for nid, values in (values() if callable(values) else values).items():
        api[nid]["inputs"].update(values)
    new = json.dumps(api, indent=2) + "\n"
    if new != text:
        write_atomic(path, new.encode())
    return api


def build(page, name, spec) -> dict:
    api = twin_with_values(spec)
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


THUMB = 512        # the Templates browser draws a square card; frontend 1.32.9 asks for <template name>.jpg
THUMB_BAND = 104   # the one-line description under the picture
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def thumbnail(screenshot_png: bytes, text: str) -> bytes:
    """A square JPEG: the screenshot fitted above a band with the template's one-line description."""
    import io
    import textwrap
    from PIL import Image, ImageDraw, ImageFont
    shot = Image.open(io.BytesIO(screenshot_png)).convert("RGB")
    card = Image.new("RGB", (THUMB, THUMB), (32, 32, 36))
    shot.thumbnail((THUMB, THUMB - THUMB_BAND), Image.LANCZOS)
    card.paste(shot, ((THUMB - shot.width) // 2, (THUMB - THUMB_BAND - shot.height) // 2))
    draw = ImageDraw.Draw(card)
    font = ImageFont.truetype(FONT, 22) if os.path.isfile(FONT) else ImageFont.load_default()
    y = THUMB - THUMB_BAND + 12
    for line in textwrap.wrap(text, 40)[:3]:
        draw.text((16, y), line, fill=(235, 235, 235), font=font)
        y += 28
    buf = io.BytesIO()
    card.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def framed_screenshot(page) -> bytes:
    """The whole graph, zoomed to fit, clipped to the part of the page it covers."""
    ui_browser.fit_all(page)
    x0, y0, x1, y1 = page.evaluate("""() => { const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        let a = [Infinity, Infinity, -Infinity, -Infinity];
        for (const g of app.graph._groups || []) { const [x, y, w, h] = g._bounding || g.bounding;
          const p = ds.convertOffsetToCanvas([x, y]), q = ds.convertOffsetToCanvas([x + w, y + h]);
          a = [Math.min(a[0], p[0]), Math.min(a[1], p[1]), Math.max(a[2], q[0]), Math.max(a[3], q[1])]; }
        return [r.left + a[0], r.top + a[1], r.left + a[2], r.top + a[3]]; }""")
    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    x0, y0, x1, y1 = max(0, x0 - 8), max(0, y0 - 8), min(vw, x1 + 8), min(vh, y1 + 8)
    return page.screenshot(clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})


def run_and_capture(page, name, spec, graph, screen_path=None) -> bytes:
    """Open the built template, run it as shipped when it can run (the nodes then show their pictures) and return the
    framed screenshot; also save a full-page one to screen_path."""
    ui_browser.load_ui(page, graph, name)
    if spec.get("runs"):
        ui_browser.queue(page, timeout_s=900)
        page.wait_for_timeout(1500)  # previews load after the executed events
    shot = framed_screenshot(page)
    if screen_path:
        os.makedirs(os.path.dirname(screen_path), exist_ok=True)
        page.screenshot(path=screen_path)
    return shot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="template names or their number (default: all)")
    p.add_argument("--no-thumbnails", action="store_true", help="skip running the templates for their thumbnails")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args(argv)
    names = [n for n in SPECS if a.only is None or any(n == o or n.split(" ")[0] == o for o in a.only)]
    with tempfile.TemporaryDirectory(prefix="idfusion_ui_build_") as base:
        ui_browser.seed_user_settings(base)
        with comfy_server.ComfyServer(a.comfyui, base) as server, ui_browser.Browser() as browser:
            page = browser.open(server.url)
            for name in names:
                spec = SPECS[name]
                graph = build(page, name, spec)
                path = os.path.join(WORKFLOWS, f"{name}.json")
                write_atomic(path, (json.dumps(graph, indent=1) + "\n").encode())
                print(path)
                if not a.no_thumbnails:
                    screen = os.path.join(ROOT, "docs", "screens", "demo_template_ui.png") \
                        if spec["twin"] == "idfusion_synthetic_demo_api.json" else None
                    fresh = browser.open(server.url)  # one tab, as a user who just opened the template sees it
                    shot = run_and_capture(fresh, name, spec, graph, screen)
                    fresh.close()
                    write_atomic(os.path.join(WORKFLOWS, f"{name}.jpg"), thumbnail(shot, spec["describe"]))
                    print(os.path.join(WORKFLOWS, f"{name}.jpg"))


if __name__ == "__main__":
    main()
