"""Built-in demo data, generated on first use: no download, deterministic, small, varied enough to learn from.

Audio: a few harmonic notes with vibrato per clip (WAV, `audiofolder` layout).
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


def demo_audio(rng, seconds=1.0, sample_rate=22050):
    """One clip with structure a vocoder can learn: a few notes, each a harmonic tone (pitch 110-440 Hz with
    vibrato, harmonics falling off at a random rate) under an attack-decay envelope, with a little breath noise."""
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    bounds = np.sort(rng.integers(0, n, size=int(rng.integers(1, 4)))).tolist() + [n]
    start = 0
    for end in bounds:
        if end - start < sample_rate // 20:
            continue
        f0 = 110 * 2 ** rng.uniform(0, 2)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 7) * t[start:end])
        phase = 2 * np.pi * np.cumsum(f0 * vibrato) / sample_rate
        rolloff = rng.uniform(0.5, 0.9)
        note = sum(rolloff**k * np.sin((k + 1) * phase) for k in range(12) if (k + 1) * f0 < sample_rate / 2)
        length = end - start
        envelope = np.minimum(1, np.arange(length) / (0.02 * sample_rate)) * np.exp(-np.arange(length) /
                                                                                     (rng.uniform(0.2, 0.8) * sample_rate))
        out[start:end] += note * envelope
        start = end
    out += rng.normal(0, 0.01, n)
    return (0.5 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def make_demo_audio(out_dir, num_files=24, seconds=1.0, sample_rate=22050, seed=0):
    """Write `num_files` demo clips as 16-bit WAV files (audiofolder layout) unless they are there; returns the
    path. `seconds` may be a (low, high) range: clip lengths are then drawn from it."""
    import soundfile as sf

    out = Path(out_dir)
    meta = out / "metadata.jsonl"
    if meta.exists() and len(meta.read_text().splitlines()) == num_files:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_files):
        length = rng.uniform(*seconds) if isinstance(seconds, (tuple, list)) else seconds
        name = f"clip{i:03d}.wav"
        sf.write(str(out / name), demo_audio(rng, length, sample_rate), sample_rate, subtype="PCM_16")
        lines.append(json.dumps({"file_name": name, "text": "a few notes"}))
    meta.write_text("\n".join(lines) + "\n")
    return out


DEMO_WORDS = ("a", "and", "small", "on", "to", "background", "gradient", "striped", "plain", "an", "of", "with")


def make_demo_text_encoder(out_dir, hidden_size=64, layers=2, seed=0):
    """A small randomly initialised BERT text encoder whose vocabulary holds every word of the demo captions,
    saved with its tokenizer as a Hugging Face folder (`--text_encoder hf:PATH`): the demo's stand-in for CLIP,
    which cannot be downloaded offline. Random weights still give each caption its own embedding, so a diffusion
    model can learn to follow it. Returns the path."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *DEMO_WORDS, *COLORS, *SHAPES]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                                 num_attention_heads=max(1, hidden_size // 32), intermediate_size=hidden_size * 2,
                                 max_position_embeddings=128))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_demo_vae(out_dir, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, seed=0):
    """A small randomly initialised diffusers AutoencoderKL (downsampling 2 ** (len(block_out_channels) - 1)) saved
    as a folder, for tests of the latent diffusion script where no trained VAE is at hand. Returns the path."""
    from diffusers import AutoencoderKL

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                        norm_num_groups=8 if block_out_channels[0] < 32 else 32)
    with torch.no_grad():
        # A trained VAE's posterior is narrow (std ~0.01-0.1); a random one's is ~1, which would bury the image
        # under sampling noise. Narrow it, then shift and scale latents to zero mean and unit variance on demo
        # images, as latent_stats.json would.
        vae.quant_conv.bias[latent_channels:] -= 6.0  # log-variance: std ~0.05
        rng = np.random.default_rng(seed)
        images = torch.stack([torch.from_numpy(np.asarray(demo_image(rng, 32)[0], dtype=np.float32) / 127.5 - 1)
                              .permute(2, 0, 1) for _ in range(16)])
        z = vae.encode(images).latent_dist.sample()
    vae.register_to_config(scaling_factor=1.0 / z.std().item(), shift_factor=z.mean().item())
    vae.save_pretrained(out, safe_serialization=True)
    return out
