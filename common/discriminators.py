"""Discriminators. Each returns `(logits, feature_maps)`; `CombinedDiscriminator` runs several on the same input
and returns `(list_of_logits, list_of_feature_map_lists)`, the form `common.losses` consumes (DAC's layout)."""

import torch.nn as nn
import torch.nn.functional as F


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix), as used for the Stable Diffusion / taming VAE.

    Four-by-four convolutions; `n_layers` stride-2 stages; the output is a map of logits, one per overlapping
    patch (70x70 pixels for n_layers=3), so it works at any resolution. With ndf=64 and n_layers=3: 2.77M params (2,765,633).
    """

    def __init__(self, in_channels=3, ndf=64, n_layers=3, norm="batch"):
        super().__init__()
        norm_layer = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(32 if c % 32 == 0 else 1, c),
                      "none": lambda c: nn.Identity()}[norm]
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers.append(nn.Sequential(
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=norm == "none"),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(ndf * mult, 1, 4, 1, 1)
        self.apply(_init_weights)

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return self.head(x), features  # logits (B, 1, h, w)


def _init_weights(m):
    # pix2pix initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for norm scales.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Downsampled(nn.Module):
    """Run `inner` on the input average-pooled by `factor` (the multi-scale trick of pix2pixHD and MelGAN)."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        if self.factor > 1:
            x = F.avg_pool2d(x, self.factor, self.factor) if x.ndim == 4 else F.avg_pool1d(x, self.factor, self.factor)
        return self.inner(x)


class CombinedDiscriminator(nn.Module):
    """Several discriminators on the same input: returns the lists of their logits and feature-map lists."""

    def __init__(self, discriminators):
        super().__init__()
        self.discriminators = nn.ModuleList(discriminators)

    def forward(self, x):
        logits, features = [], []
        for d in self.discriminators:
            out, feats = d(x)
            logits.append(out)
            features.append(feats)
        return logits, features


IMAGE_DISCRIMINATORS = ("patchgan", "multiscale-patchgan")


def build_image_discriminator(kind="patchgan", in_channels=3, ndf=64, n_layers=3, norm="batch", num_scales=3):
    """`patchgan`: one NLayerDiscriminator; `multiscale-patchgan`: one per scale at 1x, 1/2x, 1/4x, ..."""
    if kind == "patchgan":
        return CombinedDiscriminator([NLayerDiscriminator(in_channels, ndf, n_layers, norm)])
    if kind == "multiscale-patchgan":
        return CombinedDiscriminator([
            Downsampled(NLayerDiscriminator(in_channels, ndf, n_layers, norm), 2**i) for i in range(num_scales)])
    raise ValueError(f"unknown discriminator '{kind}' (choose from {', '.join(IMAGE_DISCRIMINATORS)})")
