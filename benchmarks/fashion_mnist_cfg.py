#!/usr/bin/env python
"""Does class conditioning work? A classifier trained on real Fashion-MNIST judges samples of a class-conditional
train_ldm.py export: the fraction recognised as the class they were asked for, at several CFG scales.

    python benchmarks/fashion_mnist_cfg.py train-classifier --train DATA/train --test DATA/test --out clf.pt
    python benchmarks/fashion_mnist_cfg.py evaluate --classifier clf.pt --model out/ldm_fmnist --scales 1 4

Data: `build-datasets OUT --only fashion-mnist` (imagefolder layout, 32 x 32 greyscale, `label` 0-9 in
metadata.jsonl). The classifier is a small CNN (two conv blocks, ~0.4M parameters) trained for a few epochs; its
accuracy on the real test set is printed beside the samples' so the two can be read together.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load_split(folder, limit=None):
    """(images (N, 1, 32, 32) in [-1, 1], labels (N,)) of an imagefolder split."""
    records = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines() if line]
    records = records[:limit] if limit else records
    images = np.stack([np.asarray(Image.open(Path(folder) / r["file_name"]).convert("L").resize((32, 32)),
                                  dtype=np.float32) for r in records])
    x = torch.from_numpy(images)[:, None] / 127.5 - 1
    return x, torch.tensor([int(r["label"]) for r in records])


def classifier():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(128 * 4 * 4, 10))


def to_classifier_input(images):
    """Decoded samples (N, 3, H, W) in [-1, 1] -> (N, 1, 32, 32): grey, at the classifier's size."""
    x = images.float().mean(1, keepdim=True)
    return F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)


def train_classifier(a):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x, y = load_split(a.train, a.limit)
    xt, yt = load_split(a.test)
    net = classifier().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = a.epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for epoch in range(a.epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(128)[: len(x) // 128]:
            xb = x[idx].to(device)
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, device=device) < 0.5, xb, xb.flip(-1))  # flips
            loss = F.cross_entropy(net(xb), y[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    accuracy = evaluate_net(net, xt, yt, device)
    torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy}, a.out)
    print(json.dumps({"classifier_test_accuracy": accuracy, "train_images": len(x), "epochs": a.epochs}))


@torch.no_grad()
def evaluate_net(net, x, y, device):
    net.eval()
    predictions = torch.cat([net(xb.to(device)).argmax(1).cpu() for xb in x.split(512)])
    return (predictions == y).float().mean().item()


def evaluate(a):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = torch.load(a.classifier, map_location="cpu", weights_only=True)
    net = classifier().to(device)
    net.load_state_dict(saved["state_dict"])
    config = json.loads((Path(a.model) / "ldm_config.json").read_text())
    names = config["class_names"]
    results = {"classifier_test_accuracy": saved["test_accuracy"], "per_class": a.per_class, "scales": {}}
    for scale in a.scales:
        out = Path(a.output) / f"cfg_{scale:g}"
        subprocess.run([sys.executable, str(ROOT / "train_ldm.py"), "generate", "--model", a.model, "--output", out,
                        "--prompt", *names, "--num_images_per_prompt", str(a.per_class), "--guidance_scale",
                        str(scale), "--batch_size", "500", "--mixed_precision", a.mixed_precision], check=True,
                       stdout=subprocess.DEVNULL)
        from safetensors.torch import load_file

        decoded = load_file(out / "samples.safetensors")["decoded"]  # seed-major: sample n asks for names[n % 10]
        asked = torch.tensor([int(names[n % len(names)]) for n in range(len(decoded))])
        results["scales"][f"{scale:g}"] = evaluate_net(net, to_classifier_input(decoded), asked, device)
    print(json.dumps(results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="Train the judge on real Fashion-MNIST.")
    t.add_argument("--train", required=True, help="The train split folder.")
    t.add_argument("--test", required=True, help="The test split folder.")
    t.add_argument("--out", required=True, help="Where the classifier's weights go (a .pt of tensors).")
    t.add_argument("--epochs", type=int, default=5, help="Passes over the training split.")
    t.add_argument("--limit", type=int, default=None, help="Use only the first N training images.")
    e = sub.add_parser("evaluate", help="Sample each class from an export and classify the samples.")
    e.add_argument("--classifier", required=True, help="The train-classifier output.")
    e.add_argument("--model", required=True, help="A class-conditional train_ldm.py export trained on Fashion-MNIST.")
    e.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0], help="CFG scales to compare.")
    e.add_argument("--per_class", type=int, default=50, help="Samples per class and scale.")
    e.add_argument("--output", default="fmnist_cfg", help="Folder for the samples.")
    e.add_argument("--mixed_precision", default="no", choices=["no", "bf16"], help="Autocast while sampling.")
    a = parser.parse_args(argv)
    (train_classifier if a.command == "train-classifier" else evaluate)(a)


if __name__ == "__main__":
    main()
