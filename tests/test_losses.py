import pytest
import torch

from common.losses import (LPIPS, adaptive_gan_weight, discriminator_loss, feature_matching_loss, generator_loss,
                           kl_loss, kl_per_channel, r1_penalty)


def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: mean(relu(1 - real)) + mean(relu(1 + fake)) = 0.25 + 0.5
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    # lsgan: mean((real-1)^2) + mean(fake^2) = (1 + .25)/2 + (4 + 0)/2
    assert discriminator_loss(real, fake, "lsgan").item() == pytest.approx(0.625 + 2.0)
    assert generator_loss(fake, "lsgan").item() == pytest.approx((9 + 1) / 2)
    sp = torch.nn.functional.softplus
    expected = (sp(-real).mean() + sp(fake).mean()).item()
    assert discriminator_loss(real, fake, "non-saturating").item() == pytest.approx(expected)


def test_lists_of_logits_are_summed():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 2, 2)
    total = discriminator_loss([a, b], [b.mean(), a.mean()])
    assert total.item() == pytest.approx(
        (discriminator_loss(a, b.mean()) + discriminator_loss(b, a.mean())).item())
    with pytest.raises(ValueError):
        discriminator_loss(a, b, "wasserstein")


def test_feature_matching_zero_on_identical_and_detaches_real():
    feats = [[torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], [torch.randn(2, 4, 16)]]
    assert feature_matching_loss(feats, feats).item() == 0.0
    real = [[torch.randn(2, 3, requires_grad=True)]]
    fake = [[torch.randn(2, 3, requires_grad=True)]]
    feature_matching_loss(real, fake).backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None


def test_kl_against_closed_form():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert kl_loss(mean, logvar).item() == 0.0
    mean = torch.full((1, 1, 1, 1), 2.0)
    logvar = torch.full((1, 1, 1, 1), 1.0)
    expected = 0.5 * (4 + torch.e - 1 - 1)
    assert kl_loss(mean, logvar).item() == pytest.approx(expected)


def test_kl_is_resolution_invariant():
    torch.manual_seed(0)
    small = kl_loss(torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8) * 0.1)
    torch.manual_seed(0)
    big = kl_loss(torch.randn(4, 4, 64, 64), torch.randn(4, 4, 64, 64) * 0.1)
    assert abs(small.item() - big.item()) < 0.1


def test_free_bits_clamp_per_channel():
    mean = torch.zeros(2, 3, 4, 4)
    mean[:, 0] = 2.0  # channel 0: KL 2 nats per element; channels 1, 2: 0
    assert kl_per_channel(mean, torch.zeros_like(mean)).tolist() == pytest.approx([2.0, 0.0, 0.0])
    assert kl_loss(mean, torch.zeros_like(mean), free_bits=0.5).item() == pytest.approx((2.0 + 0.5 + 0.5) / 3)
    # A channel below the floor gets no gradient: nothing to gain from shrinking it further.
    m = mean.clone().requires_grad_(True)
    kl_loss(m, torch.zeros_like(m), free_bits=0.5).backward()
    assert m.grad[:, 1:].abs().sum() == 0 and m.grad[:, 0].abs().sum() > 0


def test_r1_of_a_linear_discriminator():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    x = torch.randn(5, 2, requires_grad=True)
    penalty = r1_penalty(x @ w, x)  # grad_x = w for every sample: ||w||^2 = 25
    assert penalty.item() == pytest.approx(25.0)
    assert penalty.requires_grad  # differentiable w.r.t. D's parameters


def test_adaptive_weight_balances_gradient_norms():
    layer = torch.nn.Parameter(torch.ones(3))
    rec = (layer * 2).sum()
    gan = (layer * 8).sum()
    assert adaptive_gan_weight(rec, gan, layer).item() == pytest.approx(0.25, rel=1e-3)


def test_lpips_zero_on_identical_and_differentiable():
    torch.manual_seed(0)
    lpips = LPIPS(pretrained_backbone=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = lpips(y, x)
    assert d.item() > 0
    d.backward()  # the loss reaches the decoder's output (a known bug elsewhere computes it under no_grad)
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
