"""The demo (make demo): identity transfer on the pack's own trained model, through a real ComfyUI server.

    .hosts/0.3.75/venv/bin/python scripts/demo.py [--host 0.3.75|0.3.52] [--reference N] [--out DIR]

The pack ships two small synthetic-faces base models, one per model family the pack fuses into, each with its IDFusion
adapter: a UNet (models/synthetic_faces.safetensors, models/idfusion/synthetic_faces_adapter.safetensors) and a Flux
DiT built by ComfyUI's own Flux class (models/synthetic_faces_flux.safetensors, ..._flux_adapter.safetensors); and
example references (workflows/assets/synthetic/): faces
drawn fresh from a continuous identity space (no model saw them in training) and an extrapolation face whose hair hue
no training face had. The demo starts ComfyUI (main.py --cpu) and queues workflows/api/idfusion_synthetic_demo_api.json
for three prompts (another expression, another pose, another background) and for the extrapolation face: each run
samples the same seed with and without the identity. Then it queues
workflows/api/idfusion_synthetic_two_identities_api.json (two references, left/right region masks). Both workflows
run once per family, the loaders pointed at that family's files and CFG, uncond and weight taken from the adapter's
own "recommended" metadata. It writes one contact sheet (reference | with identity | without) and prints, for every picture, the measured errors against its
reference (colours in CIELAB ΔE, shape in pixels), read by fitting the domain's renderer to the picture."""
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

import adapter_settings  # noqa: E402
import comfy_server  # noqa: E402

ONE = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_demo_api.json")
TWO = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_two_identities_api.json")
REFERENCES = os.path.join(ROOT, "workflows", "assets", "synthetic")
MODELS = os.path.join(ROOT, "models")
# (family, base model file in models/, its adapter in models/idfusion/)
FAMILIES = [("UNet", "synthetic_faces.safetensors", "synthetic_faces_adapter.safetensors"),
            ("Flux DiT", "synthetic_faces_flux.safetensors", "synthetic_faces_flux_adapter.safetensors")]
# the references smile, face front, on grey: each prompt changes one of the three
PROMPTS = [("another expression", "a photo of a person, crying, facing front, grey background"),
           ("another pose", "a photo of a person, smiling, facing left, grey background"),
           ("another background", "a photo of a person, smiling, facing front, teal background")]
TWO_PROMPT = "two people, smiling, teal background"
ODD_PROMPT = "a photo of a person, neutral, facing right, orange background"


def by_title(prompt: dict, title: str) -> list[str]:
    ids = [k for k, v in prompt.items() if (v.get("_meta") or {}).get("title", "").strip().lower() == title]
    if not ids:
        raise comfy_server.ComfyServerError(f"the demo workflow has no node titled '{title}'")
    return ids


def recommended(adapter_path: str) -> dict:
    """The settings the adapter's own training run chose ({"cfg", "uncond", "weight", "end_at"}), from its metadata."""
    try:
        return adapter_settings.recommended(adapter_path)
    except ValueError as e:
        raise comfy_server.ComfyServerError(str(e)) from None


def fill(prompt: dict, text: str, seed: int, model: str, adapter: str, rec: dict) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for nid in by_title(prompt, "prompt"):
        prompt[nid]["inputs"]["text"] = text
    for nid, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "KSampler":   # every sampler: the same seed, with and without the identity
            inputs.update(seed=seed, cfg=rec["cfg"])
        elif kind == "IDFusionSyntheticModelLoader":
            inputs["model_name"] = model
        elif kind == "IDFusionAdapterLoader":
            inputs["adapter_name"] = adapter
        elif kind.startswith("IDFusionApply"):
            inputs["uncond"], inputs["end_at"] = rec["uncond"], rec["end_at"]
            if inputs.get("weight") != 0.0:   # the weight-0 Apply is the plain model, for comparison
                inputs["weight"] = rec["weight"]
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


class Instrument:
    """What a picture shows, read by fitting the domain's renderer to it (benchmarks/synthetic/fit.py), compared with a
    reference's true identity (workflows/assets/synthetic/identities.json): colours in CIELAB ΔE, shape in pixels."""

    def __init__(self):
        import domain as D
        import fit as F
        self.D, self.F = D, F

    def read(self, images):
        """PIL pictures of one face at the model's resolution -> the fit's reads."""
        import numpy as np
        D = self.D
        x = D.to_tensor([np.asarray(im.convert("RGB").resize((D.SIZE, D.SIZE), resample=4)) for im in images])
        return self.F.fit(x)

    def describe(self, read, truth: dict) -> str:
        D, F = self.D, self.F
        e = F.identity_errors(read["identity"], D.from_json(truth))
        geometry = ", ".join(f"{k.replace('_', ' ')} {e[k]:.1f}" for k in D.GEOMETRY)
        return (f"skin ΔE {e['skin']:.1f}, hair ΔE {e['hair']:.1f}, eyes ΔE {e['eyes']:.1f}; px: {geometry}; "
                f"reads {read['expression']}, {read['pose']}, {read['background']} background")

    def nearer(self, read, truths: list[dict]) -> int:
        return int(self.F.distance(read["identity"], [self.D.from_json(t) for t in truths]).argmin())


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


def set_reference(server, prompt: dict, title: str, folder: str, name: str):
    """Point the workflow's reference node at a shipped example face: IDFusion Example Reference takes its name;
    a plain LoadImage gets it uploaded."""
    for nid in by_title(prompt, title):
        if prompt[nid]["class_type"] == "LoadImage":
            prompt[nid]["inputs"]["image"] = server.upload_image(os.path.join(folder, name))
        else:
            prompt[nid]["inputs"]["image"] = name


def run_family(server, one, two, a, family, model, adapter, rows, image, ref, partner, odd) -> list:
    """Both workflows on one family's files; appends the contact sheet's rows, returns what the instrument reads:
    (label, picture, the reference it should show)."""
    rec = recommended(os.path.join(MODELS, "idfusion", adapter))
    m, new_rows = [], []
    for what, text, r in [*((w, t, ref) for w, t in PROMPTS), ("extrapolation reference", ODD_PROMPT, odd)]:
        prompt = fill(one, text, a.seed, model, adapter, rec)
        set_reference(server, prompt, "reference", a.references, r["file"])
        got = pictures(server, server.wait(server.queue(prompt), timeout=300))
        with_id, without = got["with_identity"], got["without_identity"]
        new_rows.append((f"{family} - {what}: '{text}'   reference | with identity | without (same seed)",
                         [image[r["file"]], with_id, without]))
        m += [(f"{what:23s} with identity", with_id, r), (f"{what:23s} without     ", without, r)]
    prompt = fill(two, TWO_PROMPT, a.seed, model, adapter, rec)
    set_reference(server, prompt, "reference", a.references, ref["file"])
    set_reference(server, prompt, "reference 2", a.references, partner["file"])
    pic = pictures(server, server.wait(server.queue(prompt), timeout=300))["two_identities"]
    new_rows.append((f"{family} - two identities with region masks: '{TWO_PROMPT}'   left ref | right ref | picture",
                     [image[ref["file"]], image[partner["file"]], pic]))
    half = pic.width // 2
    m += [("two identities, left half ", pic.crop((0, 0, half, pic.height)), ref),
          ("two identities, right half", pic.crop((half, 0, pic.width, pic.height)), partner)]
    rows += new_rows   # only a family that ran whole gets rows
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="IDFusion demo: identity transfer on the pack's own model, through a real ComfyUI server.")
    p.add_argument("--host", default="0.3.75", help="pinned host version under .hosts/ (default 0.3.75)")
    p.add_argument("--comfyui", default=None, help="ComfyUI directory (overrides --host)")
    p.add_argument("--python", default=None, help="Python of the host (default: its venv)")
    p.add_argument("--base", default=os.path.join(ROOT, ".hosts", "demo-synthetic"), help="server base directory")
    p.add_argument("--reference", type=int, default=0, help="which fresh identity is the reference (0-7)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="where the contact sheet goes")
    p.add_argument("--references", default=REFERENCES, help="folder with identities.json and the reference PNGs")
    a = p.parse_args(argv)

    comfyui_dir = os.path.abspath(a.comfyui or os.path.join(ROOT, ".hosts", a.host, "ComfyUI"))
    if not os.path.isfile(os.path.join(comfyui_dir, "main.py")):
        print(f"demo: no ComfyUI host at {comfyui_dir}. Run `make setup` first.", file=sys.stderr)
        return 2
    listing_path = os.path.join(a.references, "identities.json")
    needed = [f for _, model, adapter in FAMILIES for f in (os.path.join(MODELS, model), os.path.join(MODELS, "idfusion", adapter))]
    for f in needed + [listing_path]:
        if not os.path.isfile(f):
            print(f"demo: {f} is missing: it ships with the pack; rebuild it with `make synthetic`.", file=sys.stderr)
            return 2
    listing = json.load(open(listing_path))["references"]
    fresh = [r for r in listing if r["kind"] == "fresh"]
    extrapolation = [r for r in listing if r["kind"] == "extrapolation"]
    if not 0 <= a.reference < len(fresh) or not extrapolation:
        print(f"demo: --reference must be 0..{len(fresh) - 1}, and identities.json must list an extrapolation face", file=sys.stderr)
        return 2
    ref, partner, odd = fresh[a.reference], fresh[(a.reference + 1) % len(fresh)], extrapolation[0]
    os.makedirs(a.out, exist_ok=True)
    python = a.python or comfy_server.default_python(comfyui_dir)
    t0 = time.monotonic()
    from PIL import Image
    instrument = Instrument()
    image = {r["file"]: Image.open(os.path.join(a.references, r["file"])).convert("RGB") for r in (ref, partner, odd)}
    server = comfy_server.ComfyServer(comfyui_dir, os.path.abspath(a.base), python=python)
    print(f"[demo] starting ComfyUI ({comfyui_dir}); log: {server.log_path}", flush=True)
    rows, measured = [], {}   # measured: per family, (label, picture, the reference it should show)
    try:
        with server.start(timeout=300):
            server.check_nodes(["IDFusionSyntheticModelLoader", "IDFusionApply", "IDFusionApplyMultiIdentity"])
            one, two = comfy_server.load_workflow(ONE), comfy_server.load_workflow(TWO)
            for family, model, adapter in FAMILIES:
                try:
                    m = run_family(server, one, two, a, family, model, adapter, rows, image, ref, partner, odd)
                except comfy_server.ComfyServerError as e:
                    if "or newer" not in str(e) or family == FAMILIES[0][0]:
                        raise
                    why = next(l for l in str(e).splitlines() if "or newer" in l and "raise" not in l).strip()
                    print(f"[demo] {family} family skipped: {why}", flush=True)
                    continue
                measured[family] = m
    except comfy_server.ComfyServerError as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    sheet = os.path.abspath(os.path.join(a.out, "idfusion_demo_sheet.png"))
    contact_sheet(rows, sheet)
    D = instrument.D
    print(f"[demo] reference: {ref['file']}, an identity no model saw in training; extrapolation reference: {odd['file']} "
          f"(hair hue in {D.HAIR_HUE_BAND[0]:.0f}-{D.HAIR_HUE_BAND[1]:.0f} degrees, a band no training face has)")
    print("[demo] errors against the picture's reference, read by fitting the renderer (calibration and figures: "
          "docs/synthetic_identity.md). Without the identity the face is random: those errors are the baseline.")
    for family, m in measured.items():
        reads = instrument.read([x[1] for x in m])
        print(f"[demo] {family} family:")
        for (label, _, truth), read in zip(m, reads):
            print(f"  {label}: {instrument.describe(read, truth['identity'])}")
        for label, read, own, other in (("left", reads[-2], ref, partner), ("right", reads[-1], partner, ref)):
            k = instrument.nearer(read, [own["identity"], other["identity"]])
            print(f"  two identities: the {label} half is nearer to {'its own reference' if k == 0 else 'the OTHER reference'}")
        hue = float(D.hue(reads[len(PROMPTS) * 2]["identity"]["hair"]))
        print(f"  extrapolation: hair hue read {hue:.0f} degrees (reference {float(D.hue(D.from_json(odd['identity'])['hair'])):.0f})")
    print(f"[demo] done in {time.monotonic() - t0:.0f}s. Contact sheet:")
    print(sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
