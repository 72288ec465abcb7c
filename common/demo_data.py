"""Built-in demo data, generated on first use: no download, deterministic, small, varied enough to learn from.

Images: coloured shapes on solid, gradient or striped backgrounds, in the Hugging Face `imagefolder` layout with a
caption (`text`) and a class (`label`: the main shape) per image in `metadata.jsonl`.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {
    "red": (214, 48, 49), "orange": (240, 140, 30), "yellow": (245, 215, 60), "green": (60, 170, 80),
    "blue": (50, 100, 220), "purple": (140, 70, 180), "white": (245, 245, 245), "black": (25, 25, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
BACKGROUNDS = ("plain", "gradient", "striped")
BACKGROUND_ODDS = (0.5, 0.35, 0.15)  # mostly smooth backgrounds, so a small model learns visibly in minutes


def _draw_shape(draw, shape, cx, cy, r, fill):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, r // 3))
    elif shape == "cross":
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def demo_image(rng, size=64):
    """One image and its (caption, label). Drawn at 4x and downsampled, so edges are anti-aliased."""
    big = size * 4
    names = list(COLORS)
    bg_name, bg2_name = rng.choice(names, size=2, replace=False)
    background = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_ODDS)]
    img = Image.new("RGB", (big, big), COLORS[bg_name])
    draw = ImageDraw.Draw(img)
    if background == "gradient":
        a, b = np.array(COLORS[bg_name]), np.array(COLORS[bg2_name])
        for y in range(big):
            draw.line([(0, y), (big, y)], fill=tuple(int(v) for v in a + (b - a) * y / (big - 1)))
    elif background == "striped":
        period = int(rng.integers(big // 8, big // 3))
        for x in range(0, big, period):
            draw.rectangle((x, 0, x + period // 2, big), fill=COLORS[bg2_name])

    label = int(rng.integers(len(SHAPES)))
    color = rng.choice([n for n in names if n not in (bg_name, bg2_name)])
    r = int(rng.integers(big // 6, big // 3))
    cx, cy = (int(rng.integers(r, big - r)) for _ in range(2))
    _draw_shape(draw, SHAPES[label], cx, cy, r, COLORS[color])
    caption = f"a {color} {SHAPES[label]}"
    if rng.random() < 0.5:  # a small second shape
        shape2 = SHAPES[rng.integers(len(SHAPES))]
        color2 = rng.choice([n for n in names if n != color])
        r2 = int(rng.integers(big // 12, big // 6))
        cx2, cy2 = (int(rng.integers(r2, big - r2)) for _ in range(2))
        _draw_shape(draw, shape2, cx2, cy2, r2, COLORS[color2])
        caption += f" and a small {color2} {shape2}"
    desc = {"plain": f"a {bg_name}", "gradient": f"a {bg_name} to {bg2_name} gradient",
            "striped": f"a {bg_name} and {bg2_name} striped"}[background]
    caption += f" on {desc} background"
    return img.resize((size, size), Image.LANCZOS), caption, label


def make_demo_images(out_dir, num_images=512, size=64, seed=0):
    """Write the demo image set to `out_dir` (imagefolder layout) unless it is already there; returns the path."""
    out = Path(out_dir)
    meta = out / "metadata.jsonl"
    if meta.exists() and len(meta.read_text().splitlines()) == num_images:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_images):
        img, caption, label = demo_image(rng, size)
        name = f"{i:05d}.png"
        img.save(out / name)
        lines.append(json.dumps({"file_name": name, "text": caption, "label": label}))
    meta.write_text("\n".join(lines) + "\n")
    return out


def make_demo_codes(folder, num_files=24, frames=400, seed=0, num_codebooks=4, codebook_size=64,
                    codec="demo-codes"):
    """Code files for train_rvq.py with structure to learn: codebook 0 mostly counts up by one (by two a fifth
    of the time), codebook k follows it k + 1 times as fast with 10% noise. Returns the folder."""
    from train_rvq import save_codes

    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    for i in range(num_files):
        steps = 1 + (torch.rand(frames, generator=g) < 0.2).long()
        steps[0] = torch.randint(codebook_size, (1,), generator=g)
        base = steps.cumsum(0)
        codes = torch.stack([(base * (k + 1) + (torch.rand(frames, generator=g) < 0.1).long()) % codebook_size
                             for k in range(num_codebooks)], dim=1)
        save_codes(folder / f"clip{i:03d}.codes.safetensors", codes, codec, 8000, 1000.0, codebook_size)
    return folder
