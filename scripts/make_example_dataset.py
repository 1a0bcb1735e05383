"""Draw the tiny training dataset that ships with the pack (workflows/assets/datasets/example_synthetic_faces/), so the
training template trains as shipped: 2 identities x 4 pictures of the synthetic domain (benchmarks/synthetic/domain.py)
with captions from the model's vocabulary, in identity subfolders (the reference is another picture of the same person).

    .hosts/0.3.75/venv/bin/python scripts/make_example_dataset.py
"""
import os
import shutil
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "workflows", "assets", "datasets", "example_synthetic_faces")
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "synthetic"))
import domain as D  # noqa: E402


def main():
    tmp = OUT + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(0)
    for who, ident in enumerate(D.identities("training", 2)):
        d = os.path.join(tmp, f"person_{who}")
        os.makedirs(d)
        for k in range(4):
            scene = D.random_scene(rng)
            im, _ = D.render([ident], scene, rng)
            Image.fromarray(im).save(os.path.join(d, f"{k}.png"), optimize=True)
            with open(os.path.join(d, f"{k}.txt"), "w") as f:
                f.write(D.caption(scene) + "\n")
    shutil.rmtree(OUT, ignore_errors=True)
    os.replace(tmp, OUT)
    print(OUT)


if __name__ == "__main__":
    main()
