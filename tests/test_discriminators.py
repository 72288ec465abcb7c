import math

import pytest
import torch

from common.discriminators import (
    AUDIO_DISCRIMINATORS, MPD_PERIODS, BandDiscriminator, NLayerDiscriminator, PeriodDiscriminator, Pooled,
    ResolutionDiscriminator, build_audio_discriminator, build_image_discriminator, multi_period_discriminators,
    multi_scale_discriminators)
from common.losses import feature_matching_loss, generator_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These convolutions are tiny: one thread runs them faster than two, and far faster on a busy CPU, where
    # idle OpenMP workers spin (measured: 7 s for this file on one thread, 20-70 s on two under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_patchgan_size_matches_pix2pix():
    d = NLayerDiscriminator(3, ndf=64, n_layers=3)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # 3136 + 131072 + 524288 + 2097152 + 8193 weights/biases, 1792 BatchNorm


@pytest.mark.parametrize("size, out", [(32, 2), (64, 6), (256, 30)])
def test_patchgan_shapes(size, out):
    d = NLayerDiscriminator(3, ndf=8, n_layers=3)
    logits, feats = d(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]


def test_patchgan_receptive_field_is_70_pixels():
    d = NLayerDiscriminator(3, ndf=8, n_layers=3, norm="none")
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits, _ = d(x)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == 70


def test_multiscale_returns_one_entry_per_scale():
    d = build_image_discriminator("multiscale-patchgan", ndf=8, num_scales=3)
    logits, feats = d(torch.randn(2, 3, 128, 128))
    assert [l.shape[-1] for l in logits] == [14, 6, 2]
    assert len(feats) == 3 and all(len(f) == 4 for f in feats)


def test_unknown_discriminator():
    with pytest.raises(ValueError, match="choose from patchgan"):
        build_image_discriminator("stylegan")


# Audio discriminators

def _num_params(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_hifigan_discriminator_sizes_match_the_paper():
    # The official hifi-gan repository's counts: MPD 41.1M, MSD 29.6M (weight/spectral norm adds no parameters
    # beyond weight norm's per-channel scale).
    assert _num_params(multi_period_discriminators()) == 41_105_770
    assert _num_params(multi_scale_discriminators(spectral_norm_first=True)) == 29_618_821
    # Weight norm on the full-rate copy too (the default, for exact gradient accumulation): its per-channel scales.
    assert _num_params(multi_scale_discriminators()) == 29_618_821 + 4097


_FEATURES_PER_SUB = {  # feature maps per sub-discriminator: MPD 5, MSD 7, MRD 5, multi-band 5 per band x 5 bands
    "hifigan": [5] * 5 + [7] * 3,
    "bigvgan": [5] * 5 + [5] * 3,
    "dac": [5] * 5 + [7] * 3 + [25] * 3,
}
_small = {}


def _small_discriminator(kind):
    """One width-0.25 discriminator per kind, built once with a fixed seed."""
    if kind not in _small:
        torch.manual_seed(0)
        _small[kind] = build_audio_discriminator(kind, width=0.25)
    return _small[kind]


@pytest.mark.parametrize("kind", AUDIO_DISCRIMINATORS)
def test_audio_discriminator_outputs(kind):
    d = _small_discriminator(kind)
    assert len(d.discriminators) == len(_FEATURES_PER_SUB[kind])
    generator = torch.Generator().manual_seed(1)
    for length in (2048, 2053, 4096):  # 2053 is a multiple of no period: every MPD pads
        logits, features = d(torch.randn(2, 1, length, generator=generator))
        assert [len(f) for f in features] == _FEATURES_PER_SUB[kind]
        for out in logits + [f for maps in features for f in maps]:
            assert out.shape[0] == 2 and torch.isfinite(out).all()
        assert all(out.shape[1] == 1 for out in logits)
        for period, out, maps in zip(MPD_PERIODS, logits, features):  # the MPD comes first in every kind
            assert out.shape[-1] == period and all(f.shape[-1] == period for f in maps)


def test_period_fold_reflect_pads_to_a_multiple_of_the_period():
    d = PeriodDiscriminator(7, channels=(8, 8, 8, 8, 8))
    x = torch.arange(4100.0).reshape(1, 1, -1)
    folded = d.fold(x)
    assert folded.shape == (1, 1, math.ceil(4100 / 7), 7)
    flat = folded.flatten()
    assert torch.equal(flat[:4100], x.flatten())
    assert flat[4100:].tolist() == [4098.0, 4097.0]  # 4100 = 7 * 585 + 5: two samples reflected from the end
    assert d.fold(x[..., :4095]).shape == (1, 1, 585, 7)  # already a multiple: no padding


@pytest.mark.parametrize("kind", AUDIO_DISCRIMINATORS)
def test_audio_gradients_reach_input_and_every_parameter(kind):
    d = _small_discriminator(kind)
    d.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(2)
    real = torch.randn(2, 1, 2053, generator=generator)
    fake = torch.randn(2, 1, 2053, generator=generator, requires_grad=True)
    _, real_features = d(real)
    fake_logits, fake_features = d(fake)
    (generator_loss(fake_logits) + feature_matching_loss(real_features, fake_features)).backward()
    assert torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make", [lambda: ResolutionDiscriminator(512, 50, 240, channels=8),
                                  lambda: BandDiscriminator(512, channels=8)], ids=["resolution", "band"])
def test_stft_discriminators_are_deterministic_and_see_their_input(make):
    torch.manual_seed(0)
    d = make()
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 1, 4100, generator=generator), torch.randn(2, 1, 4100, generator=generator)
    logits, features = d(x)
    again, features_again = d(x)
    assert torch.equal(logits, again) and all(torch.equal(a, b) for a, b in zip(features, features_again))
    assert (d(y)[0] - logits).abs().max() > 1e-3
    # Digital silence gives exactly-zero STFT bins: the gradient there must still be finite.
    silence = torch.zeros(1, 1, 4100, requires_grad=True)
    d(silence)[0].sum().backward()
    assert torch.isfinite(silence.grad).all()


def test_stft_discriminator_spectrograms():
    n = 4100
    t = torch.arange(n, dtype=torch.float32)
    sine = torch.sin(2 * math.pi * 32 / 512 * t).reshape(1, 1, n)  # on bin 32 of a 512-point FFT
    mrd = ResolutionDiscriminator(512, 50, 240, channels=8)
    mag = mrd.spectrogram(sine)
    assert mag.shape == (1, 1, 257, n // 50)  # (B, 1, bins, frames)
    assert (mag[0, 0, :, 1:-1].argmax(dim=0) == 32).all()  # the edge frames see the reflection's phase jump
    mbd = BandDiscriminator(512, channels=8)
    spec = mbd.spectrogram(sine)
    assert spec.shape == (1, 2, math.ceil(n / 128), 257)  # (B, real/imag, frames, bins)
    assert (spec[0, :, 1:-1].norm(dim=0).argmax(dim=-1) == 32).all()
    bands = mbd.bands
    assert bands[0][0] == 0 and bands[-1][1] == 257
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))  # the bands tile the bins


def test_msd_pooling_halves_the_length():
    x = torch.ones(1, 1, 4096)
    once, twice = Pooled(torch.nn.Identity(), 1)(x), Pooled(torch.nn.Identity(), 2)(x)
    assert once.shape[-1] == 2049 and twice.shape[-1] == 1025
    assert torch.allclose(once[..., 1:-1], torch.ones(1))  # an average: constants stay constant inside


def test_unknown_audio_discriminator():
    with pytest.raises(ValueError, match="choose from hifigan, bigvgan, dac"):
        build_audio_discriminator("melgan")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", AUDIO_DISCRIMINATORS)
def test_audio_discriminator_compiles_under_bf16_autocast(kind):
    torch.manual_seed(0)
    d = build_audio_discriminator(kind, width=0.25).cuda()
    compiled = torch.compile(d, fullgraph=True)
    x = torch.randn(2, 1, 8192, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, features = compiled(x)
        loss = generator_loss(logits) + sum(f.float().pow(2).mean() for maps in features for f in maps)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
