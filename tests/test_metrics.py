"""The identity metrics of idfusion/metrics.py against their definitions (MultiID-Bench's copy-paste, Hungarian
matching and leakage; UMO's ID-Conf) on hand-built embeddings with known angles, then Face Evaluate on a real
two-person picture built from the shipped photos (scikit-image's astronaut, the pack's reference_face.png) with the
ArcFace-shaped ONNX recognizer of tests/face_models.py, under torch.inference_mode() as ComfyUI runs nodes."""
import itertools
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import face_models as fm
from conftest import ROOT
from idfusion_pack.idfusion import faces as F
from idfusion_pack.idfusion import metrics
from idfusion_pack.nodes import eval_nodes

DIM = 512


def at(*angles, scale=1.0, dim=DIM):
    """A vector in the plane of the first two axes at `angles[0]` radians (plus, with a second angle, tilted out of
    that plane by it towards axis 2), padded to `dim` and scaled: norms must not matter."""
    a, tilt = angles[0], (angles[1] if len(angles) > 1 else 0.0)
    v = np.zeros(dim)
    v[:3] = [math.cos(a) * math.cos(tilt), math.sin(a) * math.cos(tilt), math.sin(tilt)]
    return scale * v


# ---------------------------------------------------------------------------------------------- formulas

def test_angle_and_copy_paste_on_known_angles():
    assert metrics.angle(at(0.0), at(0.7, scale=3.0)) == pytest.approx(0.7, abs=1e-6)
    assert metrics.angle(at(0.0), at(0.0, scale=5.0)) == pytest.approx(0.0, abs=1e-6)   # clipped, never nan
    assert metrics.angle(at(0.0), at(math.pi)) == pytest.approx(math.pi, abs=1e-6)
    r, t = at(0.0), at(1.0, scale=2.0)   # theta(t, r) = 1 rad
    # g between them at phi from r: theta_gt = 1 - phi, theta_gr = phi  ->  M_CP = 1 - 2 phi
    for phi in (0.0, 0.1, 0.25, 0.5, 0.8, 1.0):
        assert metrics.copy_paste(at(phi, scale=0.3), t, r) == pytest.approx(1 - 2 * phi, abs=1e-6), phi
    assert metrics.copy_paste(r, t, r) == pytest.approx(1.0, abs=1e-6)     # a copy of the reference
    assert metrics.copy_paste(t, t, r) == pytest.approx(-1.0, abs=1e-6)    # exactly the ground truth
    # off the t-r plane: the angles are taken in 3-D. g at 0.5 rad along the plane, tilted 0.4 rad out of it
    g = at(0.5, 0.4)
    t_gt = math.acos(math.cos(0.5) * math.cos(0.4) * math.cos(1.0) + math.sin(0.5) * math.cos(0.4) * math.sin(1.0))
    t_gr = math.acos(math.cos(0.5) * math.cos(0.4))
    assert metrics.copy_paste(g, t, r) == pytest.approx((t_gt - t_gr) / 1.0, abs=1e-6)
    # beyond the reference (further from the ground truth than the reference is): above +1, as in the original
    assert metrics.copy_paste(at(-0.5), t, r) == pytest.approx(1.0, abs=1e-6)
    assert metrics.copy_paste(at(-0.3, 0.0), at(0.5), r) == pytest.approx((0.8 - 0.3) / 0.5, abs=1e-6)
    # the reference is the ground truth (theta_tr = 0): MultiID-Bench returns 0
    assert metrics.copy_paste(at(0.4), r, at(0.0, scale=7.0)) == 0.0


def test_hungarian_match_beats_greedy_and_equals_brute_force():
    # greedy (row 0 takes its best, 0.9) totals 1.0; the optimum pairs row 0 with column 1: 0.8 + 0.85 = 1.65
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert metrics.hungarian_match(sim) == [(0, 1), (1, 0)]
    rng = np.random.default_rng(0)
    for rows, cols in [(1, 1), (2, 3), (3, 2), (3, 3), (4, 4), (5, 3)]:
        for _ in range(20):
            s = rng.uniform(-1, 1, (rows, cols))
            pairs = metrics.hungarian_match(s)
            assert len(pairs) == min(rows, cols) and len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
            best = max(sum(s[r, c] for r, c in zip(rs, cs)) for rs in itertools.permutations(range(rows), min(rows, cols))
                       for cs in itertools.permutations(range(cols), min(rows, cols)))
            assert sum(s[r, c] for r, c in pairs) == pytest.approx(best, abs=1e-12)
    assert metrics.hungarian_match(np.zeros((0, 2))) == []


def test_leakage_is_the_mean_of_the_unmatched_pairs():
    # two generated faces at 0 and 1.2 rad, references at 1.1 and 0.1 rad: face 0 is reference 1, face 1 reference 0
    gen, refs = [at(0.0), at(1.2)], [at(1.1, scale=2.0), at(0.1)]
    sim = metrics.similarity_matrix(gen, refs)
    assert sim == pytest.approx(np.cos([[1.1, 0.1], [0.1, 1.1]]), abs=1e-12)
    assert metrics.hungarian_match(sim) == [(0, 1), (1, 0)]
    assert metrics.leakage(sim) == pytest.approx(math.cos(1.1), abs=1e-6)   # both off-match pairs are 1.1 rad apart
    # three faces, two references: the extra face's similarities count as leakage too (MultiID-Bench's mask)
    sim3 = metrics.similarity_matrix([at(0.0), at(1.2), at(0.5)], refs)
    assert metrics.leakage(sim3) == pytest.approx((math.cos(1.1) + math.cos(1.1) + math.cos(0.6) + math.cos(0.4)) / 4, abs=1e-6)
    assert metrics.leakage(np.array([[0.7]])) is None     # one face, one reference: nothing unmatched


def test_id_conf_per_reference():
    # faces at 0.2, 0.9, 1.5 rad. Reference 0 (at 0): top two cos 0.2 and cos 0.9. Reference 1 (at 0.55): faces 0
    # and 1 are both 0.35 rad away, so it is on two faces equally: 0
    gen = [at(0.2), at(0.9), at(1.5)]
    sim = metrics.similarity_matrix(gen, [at(0.0), at(0.55, scale=4.0)])
    s1, s2 = math.cos(0.2), math.cos(0.9)
    assert metrics.id_conf(sim)[0] == pytest.approx((s1 - s2) / s1, abs=1e-6)
    assert metrics.id_conf(sim)[1] == pytest.approx(0.0, abs=1e-6)
    # two faces equally like the reference: 0; the identity on one face only (the other opposite): capped at 1
    assert metrics.id_conf(np.array([[0.6], [0.6]])) == [0.0]
    assert metrics.id_conf(np.array([[0.5], [-0.5]])) == [1.0]
    assert metrics.id_conf(np.array([[-0.1], [-0.3]])) == [0.0]     # no face like it at all (s1 <= 0), as UMO
    assert metrics.id_conf(np.array([[0.8, 0.2]])) == [None, None]  # one face: UMO scores only several


def test_identity_scores_of_two_people_with_ground_truth():
    """gen faces A' (0.1 rad from reference A) and B' (near B); ground-truth photos in the other order."""
    ra, rb = at(0.0), at(2.0)                 # references
    ta, tb = at(0.5), at(2.6)                 # ground truth: 0.5 and 0.6 rad from their references
    ga, gb = at(0.1), at(2.5)                 # generated: A close to its reference, B close to its ground truth
    s = metrics.identity_scores([gb, ga], [ra, rb], [tb, ta])
    assert s["match"] == [1, 0]
    assert s["sim_ref"] == pytest.approx([math.cos(0.1), math.cos(0.5)], abs=1e-6)
    assert s["face_sim"] == pytest.approx([math.cos(0.5), math.cos(0.1)], abs=1e-6)
    assert s["sim_gt"] == pytest.approx([math.cos(0.1), math.cos(0.4)], abs=1e-6)
    assert s["copy_paste"][0] == pytest.approx((0.1 - 0.5) / 0.6, abs=1e-6)     # B': nearer its ground truth
    assert s["copy_paste"][1] == pytest.approx((0.4 - 0.1) / 0.5, abs=1e-6)     # A': nearer its reference
    assert s["leakage"] == pytest.approx((math.cos(2.5) + math.cos(1.9)) / 2, abs=1e-6)
    assert s["id_conf"] == pytest.approx([min(1, (math.cos(0.1) - math.cos(2.5)) / math.cos(0.1)),
                                          min(1, (math.cos(0.5) - math.cos(1.9)) / math.cos(0.5))], abs=1e-6)
    # a reference without a face scores 0 and the extra generated face stays unmatched
    one = metrics.identity_scores([ga], [ra, rb])
    assert one["match"] == [0] and one["sim_ref"] == pytest.approx([math.cos(0.1), 0.0]) and one["sim_gt"] == [None]
    assert metrics.identity_scores([], [ra])["sim_ref"] == [0.0]


# ---------------------------------------------------------------------------------------------- a real picture

ASTRO_FACE = (177, 67, 270, 160)   # the astronaut's face in her 512 x 512 photo
CARTOON_FACE = (28, 22, 100, 100)  # the face in workflows/assets/reference_face.png (128 x 128)


class KnownBoxes:
    """A detector for pictures whose faces the test placed itself: boxes (with ArcFace-template landmarks) looked up
    by the image's bytes, in insightface's detector interface. Identity comes from the real ONNX recognizer."""

    def __init__(self):
        self.boxes = {}

    def add(self, rgb, boxes):
        self.boxes[np.ascontiguousarray(rgb).tobytes()] = boxes
        return rgb

    def detect(self, bgr):
        boxes = self.boxes.get(np.ascontiguousarray(bgr[..., ::-1]).tobytes(), [])
        bb = np.array([[*b, 0.9] for b in boxes], np.float32).reshape(-1, 5)
        return bb, np.array([fm.template_kps(b) for b in boxes], np.float32).reshape(-1, 5, 2)


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """astronaut, cartoon (the shipped reference face), a two-person picture [astronaut | cartoon x4] (1024 x 512),
    the astronaut mirrored (another photo of her), and a face analysis that knows their boxes."""
    d = tmp_path_factory.mktemp("rec")
    fm.make_recognizer(d / "rec.onnx")
    from insightface.model_zoo import model_zoo
    rec = model_zoo.get_model(str(d / "rec.onnx"), providers=["CPUExecutionProvider"])
    rec.prepare(0)
    det = KnownBoxes()
    astro = data.astronaut()
    cartoon = np.asarray(Image.open(os.path.join(ROOT, "workflows", "assets", "reference_face.png")).convert("RGB"))
    big = np.asarray(Image.fromarray(cartoon).resize((512, 512), Image.BICUBIC))
    pair = np.ascontiguousarray(np.concatenate([astro, big], 1))
    mirrored = np.ascontiguousarray(astro[:, ::-1])
    det.add(astro, [ASTRO_FACE])
    det.add(cartoon, [CARTOON_FACE])
    det.add(pair, [ASTRO_FACE, tuple(512 + 4 * v if k % 2 == 0 else 4 * v for k, v in enumerate(CARTOON_FACE))])
    det.add(mirrored, [(512 - ASTRO_FACE[2], ASTRO_FACE[1], 512 - ASTRO_FACE[0], ASTRO_FACE[3])])
    fa = F.FaceAnalyzer("known boxes", "insightface", det, rec)
    return dict(fa=fa, astro=astro, cartoon=cartoon, pair=pair, mirrored=mirrored)


def as_image(rgb):
    return torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)[None]


def evaluate(**kw):
    with torch.inference_mode():
        return eval_nodes.IDFusionFaceEvaluate().evaluate(**kw)


def test_two_person_picture_is_matched_to_its_references(people):
    """References in the other order than the faces (cartoon first): the Hungarian match pairs each face with its
    own person, not with the reference of the same index."""
    fa, pair = people["fa"], people["pair"]
    out = evaluate(face_analysis=fa, image=as_image(pair), reference=as_image(people["cartoon"]), size=64, margin=0.0,
                   reference_2=as_image(people["astro"]))
    s = out["ui"]["idfusion_scores"][0]
    assert [f["match"] for f in s["faces"]] == [1, 0], s["faces"]
    assert [f["box"] for f in s["faces"]] == [list(map(float, ASTRO_FACE)), [624.0, 88.0, 912.0, 400.0]]
    # the expected numbers from the recognizer's embeddings of each face, taken one by one
    faces = fa.detect(pair)
    g = [fa.embed(pair, f) for f in faces]
    r = [fa.embed(people["cartoon"], fa.detect(people["cartoon"])[0]), fa.embed(people["astro"], fa.detect(people["astro"])[0])]
    c = [[metrics.cosine(gi, rj) for rj in r] for gi in g]
    assert c[0][1] > 0.999 and c[1][0] > 0.95 and max(c[0][0], c[1][1]) < 0.95, c   # each face is its own photo
    assert s["faces"][0]["sim"] == pytest.approx(c[0][1], abs=1e-9) and s["faces"][1]["sim"] == pytest.approx(c[1][0], abs=1e-9)
    assert s["similarity"] == pytest.approx((c[0][1] + c[1][0]) / 2, abs=1e-9)
    assert s["leakage"] == pytest.approx((c[0][0] + c[1][1]) / 2, abs=1e-9)
    conf = [min(1, (max(c[0][j], c[1][j]) - min(c[0][j], c[1][j])) / max(c[0][j], c[1][j])) for j in (0, 1)]
    assert s["id_conf"] == pytest.approx(sum(conf) / 2, abs=1e-9)
    # SSIM/PSNR compare each face with its matched reference's face: the astronaut's are the same pixels
    crop = lambda rgb, f: F.warp(rgb, F.crop_matrix(f, 64, 0.0), 64) / 255.0
    a0, a1 = crop(pair, faces[0]), crop(pair, faces[1])
    b0, b1 = crop(people["astro"], fa.detect(people["astro"])[0]), crop(people["cartoon"], fa.detect(people["cartoon"])[0])
    assert metrics.ssim(a0, b0) == pytest.approx(1.0) and metrics.ssim(a1, b1) < 0.99
    assert s["ssim"] == pytest.approx((metrics.ssim(a0, b0) + metrics.ssim(a1, b1)) / 2, abs=1e-9)
    assert s["found"] and out["result"][4] is True
    report = out["result"][5]
    assert "face 0 box (177.0, 67.0, 270.0, 160.0): reference 2" in report and ": reference 1 similarity" in report, report


def test_copy_paste_of_a_real_copy_and_of_the_ground_truth(people):
    """The generated picture IS the reference photo: M_CP = +1 (a copy); it is the ground-truth photo: -1."""
    fa, astro, mirrored = people["fa"], people["astro"], people["mirrored"]
    out = evaluate(face_analysis=fa, image=torch.cat([as_image(astro), as_image(mirrored)]), reference=as_image(astro),
                   size=64, margin=0.0, ground_truth=as_image(mirrored))
    copy, truth = out["ui"]["idfusion_scores"]
    assert copy["copy_paste"] == pytest.approx(1.0, abs=1e-6) and truth["copy_paste"] == pytest.approx(-1.0, abs=1e-6)
    g, t = (fa.embed(x, fa.detect(x)[0]) for x in (astro, mirrored))
    assert copy["sim_gt"] == pytest.approx(metrics.cosine(g, t), abs=1e-9) and truth["sim_gt"] == pytest.approx(1.0, abs=1e-9)
    assert copy["similarity"] == pytest.approx(1.0, abs=1e-9) and copy["leakage"] is None and copy["id_conf"] is None
    assert "copy_paste +1.0000" in out["result"][5] and "copy_paste -1.0000" in out["result"][5], out["result"][5]
    # the node previews the fidelity-against-copy-paste chart: one dot per image, in the chart's colours
    import folder_paths
    from idfusion_pack.idfusion import chart
    entry, = out["ui"]["images"]
    with Image.open(os.path.join(folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"])) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert chart.COLOURS[0] in colours and chart.COLOURS[1] in colours and chart.COLOURS[2] not in colours
    without = evaluate(face_analysis=fa, image=as_image(astro), reference=as_image(astro), size=64, margin=0.0)
    assert "images" not in without["ui"]


def test_haar_measures_faces_and_ssim_without_identity():
    """Issue 21: the loader's Haar option works in Face Evaluate for everything that needs no ArcFace model."""
    astro = data.astronaut()
    noisy = np.clip(astro + np.random.default_rng(1).normal(0, 8, astro.shape), 0, 255).round().astype(np.uint8)
    haar = F.load_haar()
    out = evaluate(face_analysis=haar, image=as_image(noisy), reference=as_image(astro), size=64, margin=0.0,
                   ground_truth=as_image(astro[:, ::-1]))
    sim, dist, ssim, psnr, found, report = out["result"]
    face = haar.detect(astro)[0]
    m = F.crop_matrix(haar.detect(noisy)[0], 64, 0.0)
    a, b = F.warp(noisy, m, 64) / 255.0, F.warp(astro, F.crop_matrix(face, 64, 0.0), 64) / 255.0
    assert found and math.isnan(sim) and math.isnan(dist)
    assert ssim == pytest.approx(metrics.ssim(a, b), abs=1e-9) and psnr == pytest.approx(metrics.psnr(a, b), abs=1e-9) and 0 < ssim < 1
    s = out["ui"]["idfusion_scores"][0]
    assert s["similarity"] == "nan" and s["faces"][0]["match"] == 0 and s["sim_gt"] is None
    assert "no identity model" in report and "ground_truth ignored" in report, report
