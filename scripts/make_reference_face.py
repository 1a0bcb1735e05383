"""Draw the pack's default reference face (workflows/assets/reference_face.png): a small cartoon face made
with PIL, so the demo and the end-to-end test need no photo of a real person.

    python scripts/make_reference_face.py [output.png] [--size 128]

Deterministic: the same PIL version gives the same picture. It is only a stand-in for a real reference
photo; with an untrained adapter and random weights the generated image does not depend on it visibly.
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "workflows", "assets", "reference_face.png")


def draw_face(size: int = 128) -> Image.Image:
    """Draw at 4x and downsample for smooth edges. Coordinates are on a 0..1 grid."""
    s = size * 4
    img = Image.new("RGB", (s, s), (196, 218, 236))            # pale blue background
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1):
        return [round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)]

    def pt(x, y):
        return (round(x * s), round(y * s))

    skin, shade, hair = (236, 194, 160), (214, 164, 130), (92, 58, 36)
    d.rectangle(box(0.30, 0.70, 0.70, 1.00), fill=(70, 110, 160))      # shirt
    d.rectangle(box(0.42, 0.66, 0.58, 0.80), fill=shade)              # neck
    d.ellipse(box(0.15, 0.10, 0.85, 0.62), fill=hair)                 # hair behind the head
    d.ellipse(box(0.18, 0.40, 0.28, 0.56), fill=shade)                # ears
    d.ellipse(box(0.72, 0.40, 0.82, 0.56), fill=shade)
    d.ellipse(box(0.24, 0.18, 0.76, 0.76), fill=skin)                 # face
    d.chord(box(0.22, 0.12, 0.78, 0.50), 180, 360, fill=hair)         # fringe
    for cx in (0.38, 0.62):
        d.ellipse(box(cx - 0.065, 0.40, cx + 0.065, 0.48), fill=(250, 250, 250))   # eye whites
        d.ellipse(box(cx - 0.032, 0.405, cx + 0.032, 0.475), fill=(60, 90, 60))    # irises
        d.ellipse(box(cx - 0.014, 0.425, cx + 0.014, 0.455), fill=(15, 15, 15))    # pupils
        d.arc(box(cx - 0.08, 0.33, cx + 0.08, 0.40), 200, 340, fill=hair, width=max(2, s // 80))  # brows
    d.polygon([pt(0.50, 0.47), pt(0.46, 0.57), pt(0.53, 0.57)], fill=shade)  # nose
    d.chord(box(0.39, 0.56, 0.61, 0.67), 0, 180, fill=(170, 60, 70))  # smiling mouth
    d.ellipse(box(0.29, 0.54, 0.37, 0.60), fill=(240, 170, 160))      # cheeks
    d.ellipse(box(0.63, 0.54, 0.71, 0.60), fill=(240, 170, 160))
    img = img.filter(ImageFilter.GaussianBlur(radius=1))
    return img.resize((size, size), Image.LANCZOS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", nargs="?", default=DEFAULT_OUT)
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    draw_face(a.size).save(a.output, optimize=True)
    print(f"wrote {a.output} ({a.size}x{a.size}, {os.path.getsize(a.output)} bytes)")


if __name__ == "__main__":
    main()
