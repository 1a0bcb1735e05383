"""The shipped synthetic_faces models (models/), one per family (the UNet, and the Flux DiT built by ComfyUI's own Flux
class): their loader through a real ComfyUI server with ComfyUI's own nodes, its
file checks, and a reduced evaluation that the shipped adapter transfers identities it never saw in training.
Everything runs on the files in models/ exactly as they ship (fp16); nothing is trained here."""
import copy
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_server  # scripts/ is on sys.path (conftest.py)
from conftest import ROOT, running_server

sys.path.insert(0, os.path.join(ROOT, "benchmarks", "synthetic"))
import domain as D  # noqa: E402
import run as R  # noqa: E402  (benchmarks/synthetic/run.py: the report's generator and measuring code)

from idfusion_pack.idfusion import patch_flux, synthetic  # noqa: E402
from idfusion_pack.idfusion.adapter import (AdapterError, IDFusionAdapter, read_safetensors,  # noqa: E402
                                            recommended_settings, save_safetensors_atomic)

MODELS = os.path.join(ROOT, "models")
# the DiT family's guards, from its shipped files measured the same way (2026-11-30, 2000-step adapter: top-1 50%,
# mean rank 5.6 with the adapter, 39.1 without, 36.7 with shuffled references; skin+hair ΔE 7.9 against 31.6 without;
# extrapolation hue in band 94%); a fresh attn1-initialised adapter in its place fails them
FLUX_MAX_MEAN_RANK, FLUX_MIN_TOP1, FLUX_MAX_COLOUR_RATIO = 10, 0.3, 0.5
# the UNet's guards, set from the shipped model's measured figures (2026-11-30, 6000-step adapter: on these 32 pictures top-1 43.8%,
# mean rank 4.1 with the adapter, 44.1 without, 42.4 with shuffled references, chance 49.5; skin+hair ΔE 10.9 against
# 33.5 without; extrapolation hair hue inside the band 75% here, 78.5% in the report's 256 pictures). The 1500-step
# adapter shipped before measured mean rank 9.7: these guards would fail it.
BASE = os.path.join(MODELS, "synthetic_faces.safetensors")
ADAPTER = os.path.join(MODELS, "idfusion", "synthetic_faces_adapter.safetensors")
FLUX_BASE = os.path.join(MODELS, "synthetic_faces_flux.safetensors")
FLUX_ADAPTER = os.path.join(MODELS, "idfusion", "synthetic_faces_flux_adapter.safetensors")
# per family: files and guards (mean rank at most, top-1 at least, skin+hair colour error ratio at most)
FAMILIES = {"unet": dict(base=BASE, adapter=ADAPTER, max_mean_rank=8, min_top1=0.25, max_colour_ratio=0.5),
            "flux": dict(base=FLUX_BASE, adapter=FLUX_ADAPTER, max_mean_rank=FLUX_MAX_MEAN_RANK,
                         min_top1=FLUX_MIN_TOP1, max_colour_ratio=FLUX_MAX_COLOUR_RATIO)}
OLD_HOST = patch_flux.missing_hooks() is not None   # 0.3.52: the DiT family neither runs nor fuses there
needs_new_host = pytest.mark.skipif(OLD_HOST, reason="the DiT family needs ComfyUI 0.3.75 (tested there; here: the message)")
REFERENCES = os.path.join(ROOT, "workflows", "assets", "synthetic")
ONE = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_demo_api.json")
TWO = os.path.join(ROOT, "workflows", "api", "idfusion_synthetic_two_identities_api.json")


def listing():
    with open(os.path.join(REFERENCES, "identities.json")) as f:
        return json.load(f)["references"]


@pytest.fixture(scope="module")
def shipped():
    patcher, clip, codec, meta = synthetic.load(BASE)
    return patcher, clip, codec, IDFusionAdapter.load(ADAPTER), meta


def test_models_folder_stays_within_its_budget():
    """Issue 19: models/ may hold at most 40 MB for both families together."""
    sizes = {os.path.join(d, f): os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODELS) for f in fs}
    assert sum(sizes.values()) <= 40 * 2 ** 20, sizes
    assert not os.path.exists(os.path.join(MODELS, "classifier")), "the palette model's classifier no longer ships"


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_files_say_what_they_are(family):
    f = FAMILIES[family]
    _, meta = read_safetensors(f["base"], synthetic.FORMAT, "synthetic_faces model")
    assert meta["family"] == "synthetic_faces" and "figures" in meta and "training" in meta and "seed" in meta
    assert meta.get("architecture", "unet") == family
    _, ameta = read_safetensors(f["adapter"], "idfusion.adapter", "adapter")
    assert ameta["family"] == "synthetic_faces" and "figures" in ameta and "training" in ameta
    assert json.loads(meta["figures"])["retrieval"] == json.loads(ameta["figures"])["retrieval"]
    # the validation sweep's defaults (end_at since the UNet's sweep had end_at rows; 1.0 where a file names none)
    assert {"cfg", "uncond", "weight"} <= set(json.loads(ameta["recommended"])) <= {"cfg", "uncond", "weight", "end_at"}
    rec = recommended_settings(f["adapter"])
    assert rec["uncond"] in ("text only", "identity too") and 0 < rec["end_at"] <= 1, rec


@pytest.mark.parametrize("recommended", [None, "not json", '{"cfg": 2.0}', '{"cfg": NaN, "uncond": "text only", "weight": 1}',
                                         '{"cfg": 2.0, "uncond": "both", "weight": 1}',
                                         '{"cfg": 2.0, "uncond": "text only", "weight": 1, "end_at": 0}', "[1, 2]",
                                         "[" * 100_000])
def test_damaged_recommended_settings_are_refused_naming_the_file(tmp_path, recommended):
    tensors, meta = read_safetensors(FAMILIES["unet"]["adapter"], "idfusion.adapter", "adapter")
    meta = {k: v for k, v in meta.items() if k != "recommended"}
    if recommended is not None:
        meta["recommended"] = recommended
    path = str(tmp_path / "odd_adapter.safetensors")
    save_safetensors_atomic(tensors, path, meta)
    with pytest.raises(AdapterError, match="odd_adapter.safetensors.*recommended"):
        recommended_settings(path)


@pytest.mark.skipif(not OLD_HOST, reason="the old host's message")
def test_on_the_old_host_the_dit_file_is_refused_with_the_version_it_needs():
    with pytest.raises(AdapterError, match=r"synthetic_faces_flux\.safetensors.*0\.3\.75 or newer"):
        synthetic.load(FLUX_BASE)


@needs_new_host
def test_the_dit_file_loads_as_comfyuis_flux_class_and_its_adapter_matches_its_blocks():
    from comfy.ldm.flux.model import Flux
    patcher, clip, codec, meta = synthetic.load(FLUX_BASE)
    dm = patcher.model.diffusion_model
    assert type(dm) is Flux and patch_flux.is_flux(patcher)
    assert dm.params.in_channels == codec.latent_channels and dm.patch_size == 1
    adapter = IDFusionAdapter.load(FLUX_ADAPTER)
    assert adapter.layers == patch_flux.find_layers(dm)
    with pytest.raises(AdapterError):   # the UNet family's adapter is refused on the DiT, and the other way round
        patch_flux.check_adapter(IDFusionAdapter.load(ADAPTER), patcher)
    with pytest.raises(AdapterError):
        adapter.check_model(synthetic.load(BASE)[0])


def test_codec_is_exact_for_the_models_pictures_and_refuses_other_latents(shipped):
    _, _, codec, _, _ = shipped
    ref = np.array(Image.open(os.path.join(REFERENCES, listing()[0]["file"])).convert("RGB"))
    image = torch.from_numpy(ref).float()[None] / 255.0
    with torch.inference_mode():
        latent = codec.encode(image)
        assert latent.shape == (1, codec.latent_channels, image.shape[1] // 8, image.shape[2] // 8)
        back = codec.decode(latent)
    assert torch.equal((back * 255).round().byte(), torch.from_numpy(ref)[None])
    with pytest.raises(AdapterError, match="synthetic_faces"):
        codec.decode(torch.zeros(1, 4, 8, 8))   # an SD latent


def test_text_encoder_names_unknown_words(shipped):
    _, clip, _, _, _ = shipped
    with pytest.raises(AdapterError, match=r"does not know: \['astronaut'\]"):
        clip.tokenize("a photo of a person, astronaut")
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a person, crying, facing left, teal background"))
    assert cond.shape[0] == 1 and torch.isfinite(cond).all()


@pytest.mark.parametrize("damage", ["nan", "no_unet_config", "bad_json", "wrong_codec", "missing_tensor",
                                    "unknown_architecture", "dit_config_on_unet", "huge_config", "wider_config"])
def test_damaged_model_file_is_refused_naming_it(tmp_path, damage):
    tensors, meta = read_safetensors(BASE, synthetic.FORMAT, "synthetic_faces model")
    meta, tensors = dict(meta), dict(tensors)
    if damage == "nan":
        k = next(iter(tensors))
        tensors[k] = torch.full_like(tensors[k], float("nan"))
    elif damage == "no_unet_config":
        del meta["unet_config"]
    elif damage == "bad_json":
        meta["text_encoder"] = "{not json"
    elif damage == "huge_config":   # a network far past any memory: refused before anything is allocated
        cfg = json.loads(meta["unet_config"])
        meta["unet_config"] = json.dumps({**cfg, "model_channels": 10 ** 7})
    elif damage == "wider_config":   # a plausible config that is not the one the tensors were trained with
        cfg = json.loads(meta["unet_config"])
        meta["unet_config"] = json.dumps({**cfg, "model_channels": 4096})
    elif damage == "unknown_architecture":
        meta["architecture"] = "sd3"
    elif damage == "dit_config_on_unet":   # a UNet's weights with the DiT's metadata
        fmeta = read_safetensors(FLUX_BASE, synthetic.FORMAT, "synthetic_faces model")[1]
        meta.update(architecture="flux", dit_config=fmeta["dit_config"], prediction="flow")
    elif damage == "wrong_codec":
        meta["codec"] = json.dumps({"pool": 1, "factor": 4})
    else:
        del tensors[next(k for k in tensors if k.startswith("unet."))]
    path = tmp_path / f"damaged_{damage}.safetensors"
    save_safetensors_atomic(tensors, str(path), meta)
    with pytest.raises(AdapterError, match=f"damaged_{damage}") as e:
        synthetic.load(str(path))
    # the config is checked against the tensors on the meta device, before the real network is built
    why = {"huge_config": "over 65536", "wider_config": "do not match its network config"}.get(damage)
    assert why is None or why in str(e.value), str(e.value)


def reduced_evaluation(gen, identities, use_reference, with_identity=True, per_identity=2, seed=124_000):
    """Each identity: a reference drawn in a random scene (or another identity's reference), held-out-scene captions,
    fresh seeds; every picture read by the renderer fit. -> (reads, the identity each picture should show)."""
    import fit as F
    rng = np.random.default_rng(seed)
    refs, _ = R.reference_drawings(identities, rng)
    caps = [[D.caption(D.random_scene_from(rng, held_out=True)) for _ in range(per_identity)] for _ in identities]
    pics = R.generate(gen, [[refs[use_reference(i)]] for i in range(len(identities))], caps, seed, with_identity)
    return F.fit(pics), [i for i in identities for _ in range(per_identity)]


@pytest.mark.parametrize("family", [pytest.param("unet"), pytest.param("flux", marks=needs_new_host)])
def test_shipped_adapter_copies_faces_it_never_saw(family):
    """Reduced evaluation (issue 17) on identities drawn fresh from the evaluation split (beyond the report's), 32
    pictures each way, at the adapter's recommended settings, read by the renderer fit. With the adapter the pictures
    carry the reference's colours (skin and hair ΔE well under the no-adapter error) and rank the reference's identity
    high among 100 candidates; without it, or with every identity given another identity's reference (the negative
    control), they do not. Extrapolation faces (hair hue in a band no training face has) keep a hue in that band.
    The thresholds guard the shipped model's measured behaviour (docs/synthetic_identity.md); the issue's 70%
    retrieval target is missed by this model and reported there with its figure."""
    import fit as F
    f = FAMILIES[family]
    patcher, clip, codec, _ = synthetic.load(f["base"])
    adapter = IDFusionAdapter.load(f["adapter"])
    gen = R.Generator(patcher, clip, codec, adapter, steps=16, **recommended_settings(f["adapter"]))
    ids = D.identities("evaluation", 616)[600:]
    candidates = D.identities("candidates", 99)
    got = {}
    for label, use, with_identity in (("with adapter", lambda i: i, True), ("without adapter", lambda i: i, False),
                                      ("shuffled references", lambda i: (i + 5) % len(ids), True)):
        reads, truths = reduced_evaluation(gen, ids, use, with_identity)
        ranks = [F.retrieval_rank(r["identity"], 0, [t] + candidates) for r, t in zip(reads, truths)]
        colour = [np.mean([F.identity_errors(r["identity"], t)[c] for c in ("skin", "hair")]) for r, t in zip(reads, truths)]
        got[label] = {"top1": float(np.mean(np.array(ranks) == 0)), "mean rank": float(np.mean(ranks)),
                      "skin+hair ΔE": float(np.mean(colour))}
    reads, truths = reduced_evaluation(gen, D.identities("extrapolation", 508)[500:], lambda i: i, seed=125_000)
    in_band = float(np.mean([D.in_band(D.hue(r["identity"]["hair"])) for r in reads]))
    print(f"{family}: reduced evaluation, n=32 each: {got}; extrapolation hair hue read inside the band: {in_band:.3f}")
    w, wo, sh = got["with adapter"], got["without adapter"], got["shuffled references"]
    assert w["skin+hair ΔE"] <= f["max_colour_ratio"] * wo["skin+hair ΔE"], f"the reference's colours do not come through: {got}"
    assert sh["skin+hair ΔE"] >= 0.85 * wo["skin+hair ΔE"], f"other identities' references still give these colours: {got}"
    assert w["mean rank"] <= f["max_mean_rank"], f"the reference's identity is not ranked high among 100: {got}"
    assert wo["mean rank"] >= 35 and sh["mean rank"] >= 35, f"without the right reference the ranking is not chance (49.5): {got}"
    assert w["top1"] >= f["min_top1"] and w["top1"] > wo["top1"] and w["top1"] > sh["top1"], got
    # a model that snapped to training identities would give these faces a hair hue outside the band, never inside
    assert in_band >= 0.5, f"extrapolation hair hues snap to training hues: only {in_band:.1%} inside the band"


# ---- through a real server, with ComfyUI's own nodes ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_synthetic")
    with running_server(str(base)) as srv:
        yield srv


def outputs(server, entry):
    got = {}
    for node_out in entry.get("outputs", {}).values():
        for img in node_out.get("images", []) or []:
            if img.get("type", "output") == "output":   # not the nodes' temp previews
                got[img["filename"].rsplit("_", 2)[0]] = Image.open(io.BytesIO(server.view(img))).convert("RGB")
    return got


@pytest.mark.e2e
def test_shipped_files_are_listed_by_the_loaders(server):
    info = server.object_info()
    assert "synthetic_faces.safetensors" in info["IDFusionSyntheticModelLoader"]["input"]["required"]["model_name"][0]
    assert "synthetic_faces_adapter.safetensors" in info["IDFusionAdapterLoader"]["input"]["required"]["adapter_name"][0]
    assert "synthetic_faces_flux_adapter.safetensors" in info["IDFusionAdapterLoader"]["input"]["required"]["adapter_name"][0]
    # both families' models; subfolders (the adapters) are not offered as base models
    assert sorted(info["IDFusionSyntheticModelLoader"]["input"]["required"]["model_name"][0]) == [
        "synthetic_faces.safetensors", "synthetic_faces_flux.safetensors"]


@pytest.mark.e2e
def test_demo_workflow_through_server_with_and_without_identity(server):
    prompt = comfy_server.load_workflow(ONE)
    prompt["3"]["inputs"]["image"] = listing()[0]["file"]   # IDFusion Example Reference: the shipped faces by name
    got = outputs(server, server.wait(server.queue(prompt), timeout=300))
    assert set(got) == {"with_identity", "without_identity"}, set(got)
    a, b = (np.asarray(got[k], dtype=np.int16) for k in ("with_identity", "without_identity"))
    assert a.shape == b.shape == (D.SIZE, D.SIZE, 3)
    assert np.abs(a - b).mean() > 5, "the identity changed nothing"


@pytest.mark.e2e
def test_the_dit_family_through_the_same_demo_workflow(server):
    """The same API workflow with the loaders pointed at the DiT's files: the identity changes the picture (0.3.75); on
    0.3.52 the prompt fails with the loader's message naming the ComfyUI version it needs, nothing saved."""
    prompt = comfy_server.load_workflow(ONE)
    prompt["1"]["inputs"]["model_name"] = os.path.basename(FLUX_BASE)
    prompt["2"]["inputs"]["adapter_name"] = os.path.basename(FLUX_ADAPTER)
    prompt["3"]["inputs"]["image"] = listing()[0]["file"]
    for k in ("11", "14"):
        prompt[k]["inputs"]["filename_prefix"] = "dit/" + prompt[k]["inputs"]["filename_prefix"].split("/")[-1]
    if OLD_HOST:
        with pytest.raises(comfy_server.ComfyServerError, match=r"0\.3\.75 or newer"):
            server.wait(server.queue(prompt), timeout=300)
        return
    got = outputs(server, server.wait(server.queue(prompt), timeout=300))
    assert set(got) == {"with_identity", "without_identity"}, set(got)
    a, b = (np.asarray(got[k], dtype=np.int16) for k in ("with_identity", "without_identity"))
    assert a.shape == b.shape == (D.SIZE, D.SIZE, 3)
    assert np.abs(a - b).mean() > 5, "the identity changed nothing"


@pytest.mark.e2e
def test_core_vae_and_advanced_sampler_nodes(server):
    """VAEEncode -> VAEDecode gives the picture back exactly; img2img with KSamplerAdvanced from the encoded
    reference keeps the untouched steps' content; Apply Multi-Identity works on a two-face latent."""
    base = comfy_server.load_workflow(ONE)
    prompt = {k: copy.deepcopy(base[k]) for k in ("1", "2", "3", "4", "5", "6", "7")}
    prompt["3"]["inputs"]["image"] = listing()[0]["file"]
    prompt.update({
        "20": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "roundtrip"}},
        "23": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["5", 0], "add_noise": "enable", "noise_seed": 3, "steps": 20, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["20", 0],
            "start_at_step": 12, "end_at_step": 20, "return_with_leftover_noise": "disable"}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": "img2img"}},
    })
    got = outputs(server, server.wait(server.queue(prompt), timeout=300))
    ref = np.asarray(Image.open(os.path.join(REFERENCES, listing()[0]["file"])).convert("RGB"), dtype=np.int16)
    # SaveImage truncates (255 * x -> uint8), so a value a hair under an integer comes back one lower
    assert np.abs(np.asarray(got["roundtrip"], dtype=np.int16) - ref).max() <= 1
    img2img = np.asarray(got["img2img"], dtype=np.int16)
    assert 0 < np.abs(img2img - ref).mean() < 40, "img2img should change the picture a little, not replace it"

    two = comfy_server.load_workflow(TWO)
    two["3"]["inputs"]["image"], two["5"]["inputs"]["image"] = listing()[0]["file"], listing()[1]["file"]
    pic = outputs(server, server.wait(server.queue(two), timeout=300))["two_identities"]
    assert pic.size == (2 * D.SIZE, D.SIZE)


@pytest.mark.e2e
def test_a_saved_compact_identity_gives_the_encoded_identitys_image_through_the_server(server):
    """Save Identity writes format 2 (no h_f) by default; a later prompt that loads it instead of encoding the
    reference gets the same picture (within one level in a few pixels): the Apply node recomputed h_f through the same
    model."""
    first = comfy_server.load_workflow(ONE)
    first["3"]["inputs"]["image"] = listing()[2]["file"]
    first["11"]["inputs"]["filename_prefix"] = "compact/encoded"
    first["30"] = {"class_type": "IDFusionSaveIdentity", "inputs": {"identity": ["4", 0], "filename_prefix": "shared_face"}}
    entry = server.wait(server.queue(first), timeout=300)
    saved = entry["outputs"]["30"]["text"][0]
    assert os.path.dirname(saved) == os.path.join(server.dir("models"), "idfusion", "identities"), saved
    info = server.get_json("/api/idfusion/file_info?name=identities/" + os.path.basename(saved))
    assert info["format_version"] == "2" and info["h_f"] == "recomputed when applied", info
    second = {k: copy.deepcopy(v) for k, v in first.items() if k not in ("3", "4", "30", "12", "13", "14")}
    second["4"] = {"class_type": "IDFusionLoadIdentity", "inputs": {"identity_name": "identities/" + os.path.basename(saved)}}
    second["11"]["inputs"]["filename_prefix"] = "compact/loaded"
    got = {**outputs(server, entry), **outputs(server, server.wait(server.queue(second), timeout=300))}
    encoded, loaded = (np.asarray(got[k], dtype=np.int16) for k in ("encoded", "loaded"))  # keyed by file name
    # bit for bit on the palette model; on the 96 px model the two pictures differ by at most one level in a few
    # pixels (cause not found: the recomputed h_f, or a float-order difference between the two prompts)
    diff = np.abs(encoded - loaded)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.abs(encoded - np.asarray(got["without_identity"], dtype=np.int16)).mean() > 5
