"""Procedural demo data: random street layouts rendered with a "synthetic" and a "real" look.

The synthetic side (flat colours, hard edges) is written in the Synscapes layout; the real side
(another palette, texture noise, lighting, blur) in the Cityscapes layout, so the demo goes
through the same readers as real data. The two domains differ on purpose in layout statistics
(synthetic: more cars and pedestrians; real: more vegetation), which is the covariate shift that
SP-Feat pairing and KLIEP weighting exist to handle. Every image is seeded by (seed, domain,
index), so the data is reproducible and independent of how many images are asked for.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from synreal_ray import storage
from synreal_ray.datasets.labels import LABEL_ID_OF_TRAIN, PALETTE, TRAIN_ID

# Layout statistics per domain: the deliberate shift between the two.
DOMAIN_STATS = {
    "syn": {"cars": 4.0, "persons": 3.0, "vegetation": 0.2, "poles": 2.0},
    "real": {"cars": 1.5, "persons": 0.8, "vegetation": 0.65, "poles": 2.5},
}
_C = TRAIN_ID

# The "real" palette: muted, natural colours (the synthetic look uses the Cityscapes palette flat).
_REAL_COLOURS = {
    "road": (88, 86, 92), "sidewalk": (150, 140, 132), "building": (122, 104, 94), "wall": (140, 130, 120),
    "fence": (120, 110, 90), "pole": (96, 96, 100), "traffic light": (50, 50, 45), "traffic sign": (200, 170, 60),
    "vegetation": (62, 92, 42), "terrain": (118, 122, 76), "sky": (172, 192, 214), "person": (84, 60, 62),
    "rider": (90, 50, 50), "car": (40, 52, 84), "truck": (70, 70, 80), "bus": (160, 150, 60),
    "train": (100, 100, 110), "motorcycle": (60, 60, 70), "bicycle": (80, 40, 40),
}
REAL_PALETTE = np.array([_REAL_COLOURS[n] for n in sorted(_REAL_COLOURS, key=lambda n: _C[n])], dtype=np.float32)


def make_layout(rng: np.random.Generator, height: int, width: int, domain: str) -> np.ndarray:
    """One random street scene as a train-ID map (uint8, H x W)."""
    stats = DOMAIN_STATS[domain]
    H, W = height, width
    lab = np.full((H, W), _C["sky"], dtype=np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    horizon = int(H * rng.uniform(0.38, 0.5))
    vp_x = W * rng.uniform(0.4, 0.6)

    # Skyline: blocks of buildings or trees standing on the horizon, with gaps of sky.
    x = 0
    while x < W:
        w = int(rng.integers(max(2, W // 10), max(3, W // 4)))
        if rng.random() < 0.85:
            top = horizon - int(rng.integers(max(1, H // 8), max(2, int(horizon * 0.95))))
            if rng.random() < stats["vegetation"]:
                cy, ry, rx = (top + horizon) / 2, (horizon - top) / 2 + 2, w / 2 + 2
                blob = ((xx - (x + w / 2)) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
                lab[blob & (yy < horizon + 2)] = _C["vegetation"]
            else:
                lab[max(top, 0):horizon, x:x + w] = _C["building"]
        x += w

    # Ground: terrain, then sidewalks and road converging to the vanishing point.
    below = yy >= horizon
    t = np.clip((yy - horizon) / max(1, H - horizon), 0, 1)
    road_half = t * W * rng.uniform(0.3, 0.45)
    side_half = road_half * rng.uniform(1.3, 1.7)
    dx = np.abs(xx - vp_x)
    lab[below] = _C["terrain"]
    lab[below & (dx < side_half)] = _C["sidewalk"]
    lab[below & (dx < road_half)] = _C["road"]

    def rect(cls: str, cx: float, bottom: float, w: float, h: float) -> None:
        x0, x1 = int(max(0, cx - w / 2)), int(min(W, cx + w / 2 + 1))
        y0, y1 = int(max(0, bottom - h)), int(min(H, bottom + 1))
        if x1 > x0 and y1 > y0:  # an object entirely off-screen must not wrap around via negative slices
            lab[y0:y1, x0:x1] = _C[cls]

    # Objects, far to near so that near ones occlude far ones.
    objects = []
    for _ in range(rng.poisson(stats["cars"])):
        objects.append(("car", rng.uniform(0.15, 0.95), rng.uniform(-0.8, 0.8)))
    for _ in range(rng.poisson(stats["persons"])):
        objects.append(("person", rng.uniform(0.15, 0.95), rng.choice([-1, 1]) * rng.uniform(1.05, 1.25)))
    for _ in range(rng.poisson(stats["poles"])):
        objects.append(("pole", rng.uniform(0.1, 0.9), rng.choice([-1, 1]) * rng.uniform(1.3, 1.6)))
    for cls, depth, offset in sorted(objects, key=lambda o: o[1]):
        bottom = horizon + depth * (H - horizon)
        half = depth * W * 0.38
        cx = vp_x + offset * half
        if cls == "car":
            h = depth * H * 0.28
            rect("car", cx, bottom, 1.8 * h, h)
        elif cls == "person":
            h = depth * H * 0.32
            rect("person", cx, bottom, max(1.0, 0.3 * h), h)
        else:
            h = depth * H * 0.75 + H * 0.1
            rect("pole", cx, bottom, max(1.0, depth * W * 0.01), h)
            head = "traffic sign" if rng.random() < 0.6 else "traffic light"
            s = max(2.0, depth * H * 0.06)
            rect(head, cx, bottom - h + s, s * 1.2, s * 1.4)
    return lab


def render_synthetic(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat palette colours, hard edges: the look of a cheap renderer."""
    return PALETTE[lab]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    small = rng.normal(size=(max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def render_real(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Muted palette, texture at two scales, a lighting gradient, exposure jitter and lens blur."""
    H, W = lab.shape
    img = REAL_PALETTE[lab].copy()
    img *= rng.uniform(0.85, 1.15, size=3).astype(np.float32)  # white balance
    img *= 1.0 + 0.08 * _smooth_noise(rng, H, W, 16)[..., None]  # large-scale shading
    img += rng.normal(0, 9, size=img.shape).astype(np.float32)  # fine texture / sensor noise
    light = 1.15 - 0.35 * np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    img *= light * rng.uniform(0.8, 1.1)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(radius=0.8)))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int, domain: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0 if domain == "syn" else 1, index])
    lab = make_layout(rng, height, width, domain)
    rgb = render_synthetic(lab, rng) if domain == "syn" else render_real(lab, rng)
    return rgb, LABEL_ID_OF_TRAIN[lab]


def make_demo_data(out: str, num_syn: int = 96, num_real: int = 64, num_val: int = 32,
                   height: int = 128, width: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Write `out/syn` (Synscapes layout) and `out/real` (Cityscapes layout, train and val)."""
    from tqdm import tqdm

    if min(num_syn, num_real) < 1 or num_val < 0 or min(height, width) < 16:
        raise ValueError("make-demo-data needs num_syn, num_real >= 1, num_val >= 0 and images of at least 16x16")
    syn, real = storage.join(out, "syn"), storage.join(out, "real")
    jobs = [("syn", i, None) for i in range(num_syn)]
    jobs += [("real", i, "train") for i in range(num_real)]
    jobs += [("real", num_real + i, "val") for i in range(num_val)]
    for domain, i, split in tqdm(jobs, desc="demo data", unit="img", disable=not progress):
        rgb, label_ids = _image(seed, domain, i, height, width)
        if domain == "syn":
            img_uri = storage.join(syn, "img", "rgb", f"{i}.png")
            lab_uri = storage.join(syn, "img", "class", f"{i}.png")
        else:
            city = ("aachen", "bochum")[i % 2] if split == "train" else "frankfurt"
            frame = f"{city}_{i:06d}_000019"
            img_uri = storage.join(real, "leftImg8bit", split, city, f"{frame}_leftImg8bit.png")
            lab_uri = storage.join(real, "gtFine", split, city, f"{frame}_gtFine_labelIds.png")
        storage.write_bytes(lab_uri, png_bytes(label_ids))
        storage.write_bytes(img_uri, png_bytes(rgb))
    return {"syn": syn, "real": real, "num_syn": num_syn, "num_real": num_real, "num_val": num_val}
