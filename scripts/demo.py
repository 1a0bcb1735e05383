"""The demo (make demo): identity transfer on the pack's own trained model, through a real ComfyUI server.

    .hosts/0.3.75/venv/bin/python scripts/demo.py [--host 0.3.75|0.3.52] [--reference N] [--out DIR]

The pack ships a small cartoon-faces base model (models/synthetic_faces.safetensors), its IDFusion adapter
(models/idfusion/synthetic_faces_adapter.safetensors) and reference faces of 8 identities the adapter never saw in
training (workflows/assets/synthetic/). The demo starts ComfyUI (main.py --cpu), uploads one reference and queues
workflows/api/idfusion_synthetic_demo_api.json for three prompts (another expression, another pose, another
background): each run samples the same seed with and without the identity. Then it queues
workflows/api/idfusion_synthetic_two_identities_api.json (two references, left/right region masks). It writes one
contact sheet (reference | with identity | without), prints its path, and prints which of the 8 identities the
pack's attribute classifier (models/classifier/) sees in every picture, against chance (1 in 8).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "benchmarks", "synthetic")]

import comfy_server  # noqa: E402

ONE = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_demo_api.json")
TWO = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_two_identities_api.json")
REFERENCES = os.path.join(ROOT, "workflows", "assets", "synthetic")
MODELS = os.path.join(ROOT, "models")
# the references smile, face front, on grey: each prompt changes one of the three
PROMPTS = [("another expression", "a photo of a person, crying, facing front, grey background"),
           ("another pose", "a photo of a person, smiling, facing left, grey background"),
           ("another background", "a photo of a person, smiling, facing front, teal background")]
TWO_PROMPT = "two people, smiling, teal background"


def by_title(prompt: dict, title: str) -> list[str]:
    ids = [k for k, v in prompt.items() if (v.get("_meta") or {}).get("title", "").strip().lower() == title]
    if not ids:
        raise comfy_server.ComfyServerError(f"the demo workflow has no node titled '{title}'")
    return ids


def fill(prompt: dict, references: list[str], text: str, seed: int) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for title, name in zip(("reference", "reference 2"), references):
        for nid in by_title(prompt, title):
            prompt[nid]["inputs"]["image"] = name
    for nid in by_title(prompt, "prompt"):
        prompt[nid]["inputs"]["text"] = text
    for nid, node in prompt.items():   # every sampler: the same seed, with and without the identity
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return prompt


def pictures(client, entry: dict) -> dict:
    """{SaveImage filename_prefix: PIL image} of a finished prompt, fetched through /view."""
    from PIL import Image
    out = {}
    for node_id, node_out in entry.get("outputs", {}).items():
        for img in node_out.get("images", []) or []:
            if img.get("type", "output") == "output":
                # SaveImage names files <prefix>_<counter>_.png
                out[img["filename"].rsplit("_", 2)[0]] = Image.open(io.BytesIO(client.view(img))).convert("RGB")
    return out


class Judge:
    """The pack's attribute classifier: which of the 8 unseen identities a picture shows."""

    def __init__(self, listing: list[dict], classifier: str):
        import torch
        from safetensors.torch import load_file
        import domain as D
        self.D, self.torch = D, torch
        self.clf = D.AttributeClassifier()
        self.clf.load_state_dict({k: v.float() for k, v in load_file(classifier).items()})
        self.candidates = [r["identity"] for r in listing]

    def __call__(self, image, box=None):
        """-> (index of the identity it sees, its probability among the 8, expression/pose/background read)."""
        import numpy as np
        D, torch = self.D, self.torch
        im = image.crop(box) if box else image
        x = D.to_tensor([np.asarray(im.resize((D.SIZE, D.SIZE), resample=4))])   # box filter back to 32 px
        lp = self.clf.log_probs(x)
        p = torch.softmax(D.identity_scores(lp, self.candidates), 1)[0]
        scene = {k: D.ALL_ATTRS[k][int(lp[k].argmax(1))] for k in D.SCENE_ATTRS}
        return int(p.argmax()), float(p.max()), scene


def contact_sheet(rows: list[tuple[str, list]], path: str, scale: int = 3):
    """rows of (label, [images]) -> one PNG, written atomically."""
    from PIL import Image, ImageDraw
    pad, label_h = 8, 14
    cells = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in ims] for _, ims in rows]
    width = max(sum(c.width for c in r) + pad * (len(r) + 1) for r in cells)
    height = sum(max(c.height for c in r) + label_h + pad for r in cells) + pad
    sheet = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(sheet)
    y = pad
    for (label, _), r in zip(rows, cells):
        d.text((pad, y), label, fill="black")
        x, y = pad, y + label_h
        for c in r:
            sheet.paste(c, (x, y))
            x += c.width + pad
        y += max(c.height for c in r) + pad
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    sheet.save(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="IDFusion demo: identity transfer on the pack's own model, through a real ComfyUI server.")
    p.add_argument("--host", default="0.3.75", help="pinned host version under .hosts/ (default 0.3.75)")
    p.add_argument("--comfyui", default=None, help="ComfyUI directory (overrides --host)")
    p.add_argument("--python", default=None, help="Python of the host (default: its venv)")
    p.add_argument("--base", default=os.path.join(ROOT, ".hosts", "demo-synthetic"), help="server base directory")
    p.add_argument("--reference", type=int, default=0, help="which unseen identity is the reference (0-7)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="where the contact sheet goes")
    p.add_argument("--references", default=REFERENCES, help="folder with identities.json and the reference PNGs")
    a = p.parse_args(argv)

    comfyui_dir = os.path.abspath(a.comfyui or os.path.join(ROOT, ".hosts", a.host, "ComfyUI"))
    if not os.path.isfile(os.path.join(comfyui_dir, "main.py")):
        print(f"demo: no ComfyUI host at {comfyui_dir}. Run `make setup` first.", file=sys.stderr)
        return 2
    listing_path = os.path.join(a.references, "identities.json")
    classifier = os.path.join(MODELS, "classifier", "synthetic_faces_classifier.safetensors")
    for f in (os.path.join(MODELS, "synthetic_faces.safetensors"),
              os.path.join(MODELS, "idfusion", "synthetic_faces_adapter.safetensors"), classifier, listing_path):
        if not os.path.isfile(f):
            print(f"demo: {f} is missing: it ships with the pack; rebuild it with `make synthetic`.", file=sys.stderr)
            return 2
    listing = json.load(open(listing_path))["references"]
    if not 0 <= a.reference < len(listing):
        print(f"demo: --reference must be 0..{len(listing) - 1}", file=sys.stderr)
        return 2
    second = (a.reference + 1) % len(listing)
    os.makedirs(a.out, exist_ok=True)
    python = a.python or comfy_server.default_python(comfyui_dir)
    t0 = time.monotonic()
    from PIL import Image
    judge = Judge(listing, classifier)
    ref_img = Image.open(os.path.join(a.references, listing[a.reference]["file"])).convert("RGB")
    ref2_img = Image.open(os.path.join(a.references, listing[second]["file"])).convert("RGB")
    server = comfy_server.ComfyServer(comfyui_dir, os.path.abspath(a.base), python=python)
    print(f"[demo] starting ComfyUI ({comfyui_dir}); log: {server.log_path}", flush=True)
    rows, lines = [], []
    try:
        with server.start(timeout=300):
            server.check_nodes(["IDFusionSyntheticModelLoader", "IDFusionApply", "IDFusionApplyMultiIdentity"])
            refs = [server.upload_image(os.path.join(a.references, listing[i]["file"])) for i in (a.reference, second)]
            one, two = comfy_server.load_workflow(ONE), comfy_server.load_workflow(TWO)
            for what, text in PROMPTS:
                entry = server.wait(server.queue(fill(one, refs[:1], text, a.seed)), timeout=300)
                got = pictures(server, entry)
                with_id, without = got["with_identity"], got["without_identity"]
                rows.append((f"{what}: '{text}'   reference | with identity | without (same seed)", [ref_img, with_id, without]))
                for label, im in (("with identity", with_id), ("without", without)):
                    k, prob, scene = judge(im)
                    mark = "= the reference" if k == a.reference else "(not the reference)"
                    lines.append(f"  {what:19s} {label:13s}: classifier sees identity {k} {mark}, p={prob:.2f}; "
                                 f"reads {scene['expression']}, {scene['pose']}, {scene['background']}")
            entry = server.wait(server.queue(fill(two, refs, TWO_PROMPT, a.seed)), timeout=300)
            pic = pictures(server, entry)["two_identities"]
            rows.append((f"two identities with region masks: '{TWO_PROMPT}'   left ref | right ref | picture",
                         [ref_img, ref2_img, pic]))
            half = pic.width // 2
            for side, box, want in (("left half", (0, 0, half, pic.height), a.reference),
                                    ("right half", (half, 0, pic.width, pic.height), second)):
                k, prob, _ = judge(pic, box)
                mark = "= its own reference" if k == want else f"(its reference is {want})"
                lines.append(f"  two identities {side:10s}: classifier sees identity {k} {mark}, p={prob:.2f}")
    except comfy_server.ComfyServerError as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    sheet = os.path.abspath(os.path.join(a.out, "idfusion_demo_sheet.png"))
    contact_sheet(rows, sheet)
    print(f"[demo] reference: identity {a.reference} ({', '.join(f'{k} {v}' for k, v in listing[a.reference]['identity'].items())})")
    print(f"[demo] which of the 8 unseen identities the classifier sees (chance: 1 in 8 = 12.5%):")
    print("\n".join(lines))
    print(f"[demo] done in {time.monotonic() - t0:.0f}s. Contact sheet:")
    print(sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
