"""The fidelity-against-copy-paste chart (WithAnyone's MultiID-Bench plots Sim(GT) over M_CP the same way), drawn
with Pillow only: used by scripts/face_benchmark.py (one point per setting) and by IDFusion Face Evaluate's preview
(one point per image). Pillow is imported lazily so the benchmark client still runs, without a chart, where it is
missing."""
from __future__ import annotations

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 520, 64, 24, 40, 56
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 180, 180), (240, 50, 230)]


def fidelity_chart(points, baseline: float | None = None, title: str = "Fidelity against copy-paste"):
    """A PIL image (W x H) of `points` [(label, M_CP, Sim(GT))]: Sim(GT) up, M_CP across (-1 = like the ground
    truth, +1 = a copy of the reference), axes spanning at least [-1, 1] x [0, 1], one dot per point in COLOURS order,
    labelled when there are at most 24; `baseline` a dashed line (two real photos of one person). None without
    Pillow."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return None
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min([-1.0] + xs), max([1.0] + xs)
    y0, y1 = min([0.0] + ys), max([1.0] + ys)
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)
    py = lambda y: H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)
    for k in range(5):  # grid lines and tick labels every quarter of each axis
        gx, gy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        d.line([(px(gx), TOP), (px(gx), H - BOTTOM)], fill=(230, 230, 230))
        d.line([(LEFT, py(gy)), (W - RIGHT, py(gy))], fill=(230, 230, 230))
        d.text((px(gx) - 12, H - BOTTOM + 6), f"{gx:+.2f}", fill="black", font=font)
        d.text((8, py(gy) - 6), f"{gy:.2f}", fill="black", font=font)
    d.line([(px(0.0), TOP), (px(0.0), H - BOTTOM)], fill=(150, 150, 150))
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    d.text((LEFT, 12), title + ": up = keeps the identity, left = does not copy the reference", fill="black", font=font)
    d.text((LEFT, H - 24), "M_CP (copy-paste):  -1 like the ground truth  ...  +1 a copy of the reference", fill="black", font=font)
    d.text((8, 12), "Sim(GT)", fill="black", font=font)
    if baseline is not None and y0 < baseline < y1:
        for x in range(LEFT, W - RIGHT, 8):
            d.line([(x, py(baseline)), (x + 4, py(baseline))], fill=(120, 120, 120))
        d.text((W - RIGHT - 210, py(baseline) - 14), f"two real photos of one person ~{baseline}", fill=(90, 90, 90), font=font)
    for i, (label, x, y) in enumerate(points):
        c = COLOURS[i % len(COLOURS)]
        d.ellipse([px(x) - 5, py(y) - 5, px(x) + 5, py(y) + 5], fill=c, outline="black")
        if len(points) <= 24:
            text = str(label)[:48]
            tx = px(x) + 8
            if tx + d.textlength(text, font=font) > W - 4:  # near the right edge: label on the left of the dot
                tx = px(x) - 8 - d.textlength(text, font=font)
            d.text((tx, py(y) - 6), text, fill=c, font=font)
    return img
