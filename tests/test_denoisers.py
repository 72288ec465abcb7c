import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.denoisers import (DENOISER_PRESETS, build_denoiser, count_parameters, denoiser_config,
                              denoiser_downsampling, denoiser_flops_per_sample)
from common.perf import FlopCount

CONTEXT_DIM = 24  # small, so the tiny models stay tiny; the presets' counts below use 768
TINY = ("dit-tiny", "unet-tiny")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: one thread is faster than two, and far faster on a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(preset, in_channels=4, seed=0, perturb=True, **overrides):
    """A tiny denoiser whose output depends on everything: the DiT's zero-initialised layers are perturbed."""
    torch.manual_seed(seed)
    model = build_denoiser(denoiser_config(preset, in_channels, CONTEXT_DIM, **overrides)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(shape=(2, 4, 8, 8), context_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([10.0, 900.0][: shape[0]])
    context = torch.randn(shape[0], context_len, CONTEXT_DIM, generator=g)
    return x, t, context, torch.ones(shape[0], context_len, dtype=torch.bool)


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 8, 4, 32)])
@pytest.mark.parametrize("context_len", [1, 77])
def test_output_has_the_input_shape(preset, shape, context_len):
    model = tiny(preset, in_channels=shape[1])
    x, t, context, mask = inputs(shape, context_len)
    mask[1, context_len // 2:] = False
    with torch.no_grad():
        out = model(x, t, context, mask)
        out_long_t = model(x, t.long(), context, mask)  # integer timesteps are the same timesteps
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_long_t, out)


def test_qk_norm_variant_runs():
    model = tiny("dit-tiny", qk_norm=True)
    assert any(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
    x, t, context, mask = inputs((2, 4, 4, 16))
    with torch.no_grad():
        assert model(x, t, context, mask).shape == x.shape


def test_dit_is_zero_at_init_and_learns():
    model = tiny("dit-tiny", perturb=False).train()
    x, t, context, mask = inputs()
    assert torch.equal(model(x, t, context, mask), torch.zeros_like(x))  # adaLN-Zero
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.nn.functional.mse_loss(model(x, t, context, mask), torch.randn_like(x)).backward()
    opt.step()
    with torch.no_grad():
        assert model(x, t, context, mask).abs().max() > 1e-5


@pytest.mark.parametrize("preset", TINY)
def test_masked_context_tokens_have_no_effect(preset):
    model = tiny(preset)
    x, t, context, mask = inputs(context_len=9)
    mask[0, 3:] = False
    mask[1, 0] = mask[1, 5:] = False  # padding need not be at the end
    other = context.clone()
    other[~mask] = 100 * torch.randn(int((~mask).sum()), CONTEXT_DIM)
    with torch.no_grad():
        out, out_other = model(x, t, context, mask), model(x, t, other, mask)
        # The same change without the mask does matter: the comparison can fail.
        unmasked = model(x, t, context, torch.ones_like(mask)), model(x, t, other, torch.ones_like(mask))
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out_other, out, rtol=0, atol=1e-5)
    assert (unmasked[0] - unmasked[1]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", TINY)
def test_padding_is_the_same_as_no_padding(preset):
    # Padded to 9 tokens with 4 real ones == the 4 tokens alone: the mask reaches every attention layer.
    model = tiny(preset)
    x, t, context, mask = inputs(context_len=9)
    mask[0, 4:] = False
    with torch.no_grad():
        padded = model(x, t, context, mask)[:1]
        alone = model(x[:1], t[:1], context[:1, :4], mask[:1, :4])
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def naive_attention(q, k, v, attn_mask=None, **kwargs):
    """Attention as kernels that give NaN for a row with no key to attend to (softmax over only -inf) compute it;
    PyTorch's CPU kernels return zeros there instead, which would hide a missing guard."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_all_masked_rows_are_finite_and_ignore_the_context(preset, attention, monkeypatch):
    if attention == "naive":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", naive_attention)
    model = tiny(preset)
    x, t, context, mask = inputs(context_len=5)
    mask[1] = False
    with torch.no_grad():
        out = model(x, t, context, mask)
        out_other = model(x, t, context + 50 * torch.randn_like(context), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_other[1], out[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", TINY)
def test_conditioning_matters(preset):
    model = tiny(preset)
    x, t, context, mask = inputs()
    with torch.no_grad():
        a = model(x, t, context, mask)
        b = model(x, t, torch.randn_like(context), mask)
        c = model(x, t.flip(0), context, mask)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample sees its text
    assert (a - c).abs().max() > 1e-3  # and the timestep


def test_dit_pooled_text_reaches_the_conditioning_vector():
    # With cross-attention gated off, the text can only act through c = t_emb + MLP(pooled text).
    model = tiny("dit-tiny")
    with torch.no_grad():
        for block in model.blocks:
            d = block.ada.out_features // 9
            block.ada.weight[3 * d:6 * d] = 0  # shift, scale and gate of the cross-attention branch
            block.ada.bias[3 * d:6 * d] = 0
    x, t, context, mask = inputs()
    with torch.no_grad():
        assert (model(x, t, context, mask) - model(x, t, torch.randn_like(context), mask)).abs().max() > 1e-3


def test_parameter_counts():
    with torch.device("meta"):  # shapes only: the large presets build in a fraction of a second
        counts = {name: count_parameters(build_denoiser(denoiser_config(name, 4, 768))) for name in DENOISER_PRESETS}
    assert 43e6 <= counts["dit-45m"] <= 47e6
    assert counts["dit-45m"] == 45_631_888
    assert counts["dit-tiny"] < 0.2e6
    assert counts["dit-s"] == 11_535_568
    assert counts["dit-b"] == 181_506_832
    # The 45.55M reference UNet (4 blocks of 128-256 channels, 2 layers each, cross-attention dim 768).
    assert abs(counts["unet-45m"] - 45.55e6) < 0.01e6
    assert counts["unet-45m"] == 45_558_580


@pytest.mark.parametrize("preset", TINY)
def test_config_round_trip(preset):
    model = tiny(preset)
    config = json.loads(json.dumps(model.config))  # what config.json gives back
    assert config == model.config
    twin = build_denoiser(config).eval()
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    twin.load_state_dict(model.state_dict())
    x, t, context, mask = inputs((2, 4, 4, 16))
    with torch.no_grad():
        assert torch.equal(twin(x, t, context, mask), model(x, t, context, mask))


def test_config_api():
    config = denoiser_config("dit-45m", in_channels=8, context_dim=1024, qk_norm=True, depth=4)
    assert (config["family"], config["in_channels"], config["out_channels"]) == ("dit", 8, 8)
    assert config["qk_norm"] is True and config["depth"] == 4
    assert denoiser_downsampling(config) == (2, 2)
    assert denoiser_downsampling({**config, "patch_size": [1, 4]}) == (1, 4)
    unet = denoiser_config("unet-45m", 4, 768)
    assert unet["family"] == "unet" and denoiser_downsampling(unet) == (8, 8)
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    with pytest.raises(ValueError, match="unknown denoiser preset"):
        denoiser_config("dit-xxl", 4, 768)
    with pytest.raises(ValueError, match="unknown dit config keys"):
        denoiser_config("dit-tiny", 4, 768, block_out_channels=[1])
    with pytest.raises(ValueError, match="patch size"):
        tiny("dit-tiny")(*inputs((2, 4, 5, 8)))


@pytest.mark.parametrize("preset, shape, context_len", [("dit-tiny", (2, 4, 8, 16), 7), ("dit-tiny", (2, 8, 4, 32), 77),
                                                        ("unet-tiny", (2, 4, 8, 16), 7)])
def test_flops_match_the_dispatch_counter(preset, shape, context_len):
    model = tiny(preset, in_channels=shape[1], perturb=False)
    x, t, context, mask = inputs(shape, context_len)
    # The math backend runs attention as matmuls the counter sees (CPU's fused kernel has no FLOP formula).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCount() as counter:
        model(x, t, context, mask)
    analytic = denoiser_flops_per_sample(model.config, shape[1:], context_len)
    assert analytic == pytest.approx(counter.total / shape[0], rel=0.02)


def test_rectangular_patches_for_one_row_latents():
    """patch_size [ph, pw]: [2, 2] is the square patch 2 exactly; [1, 2] takes a waveform VAE's one-row latents."""
    square, pair = tiny("dit-tiny"), tiny("dit-tiny", patch_size=[2, 2])
    x, t, context, mask = inputs((2, 4, 4, 16))
    with torch.no_grad():
        assert torch.equal(square(x, t, context, mask), pair(x, t, context, mask))
    row = tiny("dit-tiny", patch_size=[1, 2])
    x, t, context, mask = inputs((2, 4, 1, 16))
    with torch.no_grad():
        out = row(x, t, context, mask)
        assert out.shape == x.shape and torch.isfinite(out).all()
        twin = build_denoiser(json.loads(json.dumps(row.config)))  # the export's JSON round trip
        twin.load_state_dict(row.state_dict())
        assert torch.equal(twin.eval()(x, t, context, mask), out)
        # Each patch's output comes from its own token: a change in frames 4-5 reaches frames 4-5 directly, and
        # the rest only through attention (not at all with attention's output projections zeroed).
        for block in row.blocks:
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
        base = row(x, t, context, mask)
        x2 = x.clone()
        x2[..., 4:6] += 1.0
        changed = (row(x2, t, context, mask) - base).abs().amax(dim=(0, 1, 2)) > 0
        assert changed.tolist() == [i in (4, 5) for i in range(16)]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCount() as counter:
        row(x, t, context, mask)
    assert denoiser_flops_per_sample(row.config, x.shape[1:], 7) == pytest.approx(counter.total / 2, rel=0.02)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, context, mask = inputs()
    grads = []
    for flag in (False, True):
        model = tiny("dit-tiny").train()
        model.gradient_checkpointing = flag
        model(x, t, context, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
    unet = tiny("unet-tiny")
    unet.gradient_checkpointing = True
    assert unet.gradient_checkpointing and unet.unet.is_gradient_checkpointing


def test_padded_attention_heads_match_diffusers_attention():
    # 10 heads over widths 32 and 64 give heads of 3 and 6 channels, as unet-45m's 40 heads do; those are padded to
    # 8 for the fused kernels. The function, parameters and gradients must be diffusers' own.
    from diffusers.models.attention_processor import AttnProcessor2_0

    from common.denoisers import PaddedHeadAttnProcessor

    padded = tiny("unet-tiny", attention_head_dim=10).double()
    processors = padded.unet.attn_processors
    assert processors and all(isinstance(p, PaddedHeadAttnProcessor) for p in processors.values())
    reference = tiny("unet-tiny", attention_head_dim=10).double()
    reference.unet.set_attn_processor(AttnProcessor2_0())
    assert padded.state_dict().keys() == reference.state_dict().keys()

    x, t, context, mask = inputs()
    x, context = x.double(), context.double()
    mask[0, 4:] = False  # padding in one caption, none in the other
    outputs, grads = [], []
    for model in (padded, reference):
        model.zero_grad()
        out = model(x, t, context, mask)
        out.square().mean().backward()
        outputs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert outputs[0].abs().mean() > 0.1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)

    # heads that are already multiples of 8 keep diffusers' processor
    assert not any(isinstance(p, PaddedHeadAttnProcessor) for p in tiny("unet-tiny").unet.attn_processors.values())
