"""Losses shared by the scripts: GAN objectives, feature matching, KL, R1 and LPIPS.

GAN losses take a tensor of logits or a list of them (one per sub-discriminator) and sum over the list, as
HiFi-GAN and DAC do; each entry is averaged over its own elements.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

GAN_LOSSES = ("hinge", "lsgan", "non-saturating")


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def discriminator_loss(real_logits, fake_logits, kind="hinge"):
    """D's loss on real and (detached) fake logits.

    hinge:           relu(1 - D(x)) + relu(1 + D(G(z)))          (Lim & Ye 2017; the default for audio and image)
    lsgan:           (D(x) - 1)^2 + D(G(z))^2                     (Mao et al. 2017; HiFi-GAN's choice)
    non-saturating:  softplus(-D(x)) + softplus(D(G(z)))         (Goodfellow et al. 2014, logistic)
    """
    total = 0.0
    for real, fake in zip(_as_list(real_logits), _as_list(fake_logits), strict=True):
        if kind == "hinge":
            total = total + F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        elif kind == "lsgan":
            total = total + (real - 1).pow(2).mean() + fake.pow(2).mean()
        elif kind == "non-saturating":
            total = total + F.softplus(-real).mean() + F.softplus(fake).mean()
        else:
            raise ValueError(f"unknown GAN loss '{kind}' (choose from {', '.join(GAN_LOSSES)})")
    return total


def generator_loss(fake_logits, kind="hinge"):
    """G's adversarial loss on D's logits of generated samples."""
    total = 0.0
    for fake in _as_list(fake_logits):
        if kind == "hinge":
            total = total - fake.mean()
        elif kind == "lsgan":
            total = total + (fake - 1).pow(2).mean()
        elif kind == "non-saturating":
            total = total + F.softplus(-fake).mean()
        else:
            raise ValueError(f"unknown GAN loss '{kind}' (choose from {', '.join(GAN_LOSSES)})")
    return total


def feature_matching_loss(real_features, fake_features, reduction="mean"):
    """L1 distance between D's feature maps on real and generated inputs (Larsen et al. 2016; HiFi-GAN).

    Features are a list (one per sub-discriminator) of lists of tensors; real features are detached here. Each
    map's L1 is averaged over its elements; `reduction` "mean" averages over the maps, "sum" adds them up (the
    convention of HiFi-GAN and DAC, whose feature-matching weight of 2.0 assumes it).
    """
    total, count = 0.0, 0
    for real_maps, fake_maps in zip(real_features, fake_features, strict=True):
        for real, fake in zip(real_maps, fake_maps, strict=True):
            total = total + F.l1_loss(fake, real.detach())
            count += 1
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"unknown reduction '{reduction}' (choose from mean, sum)")
    return total / max(count, 1)


def kl_loss(mean, logvar, free_bits=0.0):
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over latent elements and the batch.

    Averaging (not summing) over elements makes one weight work at any resolution (the FluxFlow seed's "KL
    normalisation"). With `free_bits` > 0, each latent channel's KL (averaged over batch and positions) is
    clamped from below at that many nats (Kingma et al. 2016, "free bits"), so the optimiser gains nothing by
    pushing a channel's KL under the floor, the usual road to posterior collapse.
    """
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())  # (B, C, ...)
    if free_bits > 0:
        dims = [d for d in range(kl.ndim) if d != 1]
        return kl.mean(dim=dims).clamp(min=free_bits).mean()
    return kl.mean()


def kl_per_channel(mean, logvar):
    """KL per latent channel, averaged over batch and positions: (C,). For monitoring."""
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return kl.mean(dim=[d for d in range(kl.ndim) if d != 1])


def r1_penalty(real_logits, real_inputs):
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real inputs. Multiply by gamma / 2.

    `real_inputs` must have had requires_grad set before the discriminator saw them. The graph is kept so the
    penalty can be backpropagated into D.
    """
    total = sum(logits.float().sum() for logits in _as_list(real_logits))
    (grad,) = torch.autograd.grad(total, real_inputs, create_graph=True)
    return grad.float().pow(2).reshape(grad.size(0), -1).sum(1).mean()


def adaptive_gan_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7): ||grad rec|| / ||grad gan|| at the decoder's last layer,
    so the adversarial term never swamps reconstruction. Returned detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LPIPS(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018) with the VGG16 backbone, frozen, differentiable in its input.

    `pretrained_backbone=True` loads torchvision's ImageNet VGG16 weights (downloaded on first use) and the LPIPS
    linear heads shipped with the `lpips` package; False keeps a randomly initialised backbone, which exercises the
    same code at the same cost but measures nothing useful (for tests and speed benchmarks only).
    Inputs are images in [-1, 1]; the result is the batch mean. Gradients flow to the inputs: never call this under
    torch.no_grad() when it is a training loss.
    """

    def __init__(self, pretrained_backbone=True):
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        self.net.eval().requires_grad_(False)

    def train(self, mode=True):  # always in eval mode (dropout off)
        return super().train(False)

    def forward(self, x, y):
        return self.net(x, y, normalize=False).mean()
