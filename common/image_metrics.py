"""Sample-quality metrics for generated images: FID, Inception Score and CLIP score.

FID (Heusel et al. 2017) compares Gaussians fitted to Inception-v3 pool features of generated and reference
images; the Inception Score (Salimans et al. 2016) rates the class predictions of the generated images alone;
CLIPScore (Hessel et al. 2021) measures how well an image matches its caption in a CLIP embedding space.

The features come from torchvision's ImageNet Inception-v3, not from the TensorFlow graph that published FIDs use
(pytorch-fid and torch-fidelity port that one), and images are resized by bilinear interpolation: the numbers
compare runs of these scripts with each other, not with papers.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGE_EXTENSIONS, CorruptSample, find_files, image_to_tensor, load_image, resize_and_crop

INCEPTION_SIZE = 299


class InceptionFeatures(nn.Module):
    """Frozen torchvision Inception-v3: images (B, 3 or 1, H, W) in [-1, 1], any size -> (pool features (B, 2048),
    logits (B, 1000)), both float32.

    `weights="DEFAULT"` downloads torchvision's ImageNet weights (once, into the torch hub cache); `weights=None`
    gives random stand-in weights for tests. Images are resized to 299 x 299 (bilinear, antialiased when
    shrinking). torchvision's weights were trained on inputs in [-1, 1], so the model is built with
    transform_input=False and takes the images as they are."""

    def __init__(self, weights="DEFAULT"):
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3

        if weights is not None:
            weights = Inception_V3_Weights.verify(weights)
        # stand-in weights keep PyTorch's default init: torchvision's truncated-normal one takes seconds
        net = inception_v3(weights=weights, aux_logits=False, transform_input=False, init_weights=False)
        self.fc = net.fc
        net.fc = nn.Identity()  # net(x) now ends at the 2048-d average pool (dropout is off in eval mode)
        self.net = net
        if weights is not None:
            self.key = f"torchvision-inception_v3:{weights.name}"
        else:  # random stand-ins: named by their values, so a cache never mixes two of them
            first = net.Conv2d_1a_3x3.conv.weight.detach().numpy().tobytes()
            self.key = f"inception_v3:random:{hashlib.sha256(first).hexdigest()[:12]}"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # batch norm must keep its running statistics

    def forward(self, images):
        x = images.float().clamp(-1, 1)
        if x.size(1) == 1:
            x = x.expand(-1, 3, -1, -1)  # greyscale
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            shrink = min(x.shape[-2:]) > INCEPTION_SIZE
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                              antialias=shrink)
        dtype = self.fc.weight.dtype
        features = self.net(x.to(dtype))  # (B, 2048)
        return features.float(), self.fc(features).float()  # (B, 2048), (B, 1000)


# ---------------------------------------------------------------------------------------------------------------
# FID


def feature_stats(features):
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64; N >= 2."""
    x = torch.as_tensor(features).detach().double().cpu()
    if x.ndim != 2 or x.size(0) < 2:
        raise ValueError(f"feature_stats needs (N >= 2, D) features (got shape {tuple(x.shape)})")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.size(0) - 1)


def _psd_sqrt(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), as a float:

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    The last trace is the sum of the square roots of the eigenvalues of sigma1 sigma2. With A = sigma1^(1/2),
    sigma1 sigma2 = A (A sigma2) has the eigenvalues of (A sigma2) A = A sigma2 A, which is symmetric: so float64
    eigendecompositions of symmetric matrices suffice, with no complex round-off and no scipy. This also holds
    for singular covariances (fewer samples than dimensions). scipy.linalg.sqrtm gives the same value (tested)."""
    mu1, mu2 = (torch.as_tensor(m).detach().double().cpu() for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).detach().double().cpu() for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
                         f"covariances {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    middle = root1 @ sigma2 @ root1
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * eigenvalues.sqrt().sum()
    return max(float(value), 0.0)  # the exact value is >= 0; round-off may dip below


# ---------------------------------------------------------------------------------------------------------------
# Inception Score and CLIP score


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016) from classifier logits (N, classes): the images are cut into
    `splits` consecutive groups (at most N), and per group

        IS = exp( mean_i KL(p(y | x_i) || p(y)) ),   p(y) = the group's mean prediction;

    returns (mean, std) over the groups as floats. 1 for uninformative or identical predictions; the number of
    classes for confident predictions spread evenly over all of them."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    log_p = torch.log_softmax(logits, dim=1)  # (N, C)
    scores = []
    for group in torch.tensor_split(log_p, min(splits, len(log_p))):
        log_marginal = torch.logsumexp(group, dim=0) - np.log(len(group))  # log p(y), (C,)
        kl = (group.exp() * (group - log_marginal)).sum(1)  # (n,)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def clip_score(image_features, text_features):
    """CLIPScore per image-caption pair, (B,): 100 * max(cos(image, text), 0), the scaling torchmetrics uses
    (Hessel et al. 2021 weight by 2.5 instead). Features (B, D) from a CLIP model's encode_image / encode_text;
    the caller reports the mean."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return 100 * cos.clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics, cached


class ReferenceStats:
    """FID statistics (mu, sigma) of a reference image folder, computed once and then read from
    `cache_dir/fid_reference_<hash>.npz`.

    The cache key covers the folder, the chosen files (names and sizes), their count, the resolution and the
    feature network's `key`: change any and the statistics are recomputed. `num_images` files are taken evenly
    spaced through the sorted listing (all by default), each centre-cropped to `resolution` as the training data
    is, so the reference goes through the same resizing as samples of that resolution. Unreadable images are
    skipped."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        self._memory = {}

    def get(self, folder, extractor, num_images=None, resolution=None, batch_size=32, device=None):
        """-> (mu (D,), sigma (D, D)) float64 tensors, from memory, the cache file, or `extractor` (a module
        images (B, 3, H, W) in [-1, 1] -> (features, logits), with a `key` attribute, e.g. InceptionFeatures)."""
        folder = Path(folder).expanduser().resolve()
        files = find_files(folder, IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images in reference folder {folder}")
        if num_images and num_images < len(files):
            files = [files[i] for i in np.linspace(0, len(files) - 1, num_images).round().astype(int)]
        resolution = resolution or INCEPTION_SIZE
        listing = hashlib.sha256("\n".join(f"{f.relative_to(folder)}\0{f.stat().st_size}" for f in files).encode())
        key = json.dumps({"folder": str(folder), "files": listing.hexdigest(), "count": len(files),
                          "resolution": resolution, "features": extractor.key}, sort_keys=True)
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"fid_reference_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if path.is_file():
            with np.load(path) as cached:
                if str(cached["key"]) == key:
                    stats = torch.from_numpy(cached["mu"]), torch.from_numpy(cached["sigma"])
                    self._memory[key] = stats
                    return stats
        stats = self._compute(files, extractor, resolution, batch_size, device)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:  # written aside then renamed: a reader never sees half a file
            np.savez(fh, mu=stats[0].numpy(), sigma=stats[1].numpy(), key=np.array(key))
        os.replace(tmp, path)
        self._memory[key] = stats
        return stats

    @staticmethod
    def _compute(files, extractor, resolution, batch_size, device):
        device = device or next(extractor.parameters(), torch.empty(0)).device
        total = total_outer = None  # running sums in float64: 50k x 2048 features never sit in memory at once
        count = 0
        for start in range(0, len(files), batch_size):
            images = []
            for f in files[start:start + batch_size]:
                try:
                    images.append(image_to_tensor(resize_and_crop(load_image(f), resolution)))
                except CorruptSample:
                    continue
            if not images:
                continue
            with torch.no_grad():
                features, _ = extractor(torch.stack(images).to(device))
            x = features.detach().double().cpu()  # (b, D)
            total = x.sum(0) if total is None else total + x.sum(0)
            total_outer = x.T @ x if total_outer is None else total_outer + x.T @ x
            count += len(x)
        if count < 2:
            raise ValueError(f"fewer than 2 readable reference images among {len(files)}")
        mu = total / count
        sigma = (total_outer - count * torch.outer(mu, mu)) / (count - 1)
        return mu, sigma
