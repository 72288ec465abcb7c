import pytest
import torch

from common.discriminators import NLayerDiscriminator, build_image_discriminator


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
