"""Runs common.group_norm's Triton kernels through Triton's interpreter on the CPU (TRITON_INTERPRET=1 is set before
the import) against PyTorch's GroupNorm + SiLU, and prints the largest errors as JSON for test_group_norm.py.
Tiles of 64 elements and merges of 4 tiles at a time, so that the small shapes here span several tiles with a
partial last one, and several merge steps with a partial last one.

    python tests/group_norm_probe.py   # the kernels against PyTorch, a fused VAE against an unfused one, compiled
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common.group_norm as gn  # noqa: E402

gn.TILE_ELEMENTS = 64
gn.MERGE_ROWS = 4


def reference(x, w, b, groups, eps):
    return F.silu(F.group_norm(x, groups, w, b, eps))


def errors(shape, groups, dtype, channels_last, offset=0.0, channel_slice=False):
    """Largest absolute errors of y, dx, dweight, dbias against float64 PyTorch, each relative to the reference's
    largest magnitude; and whether y and dx kept x's strides and dtype."""
    g = torch.Generator().manual_seed(sum(shape) + groups)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + offset
    w64 = torch.randn(shape[1], generator=g, dtype=torch.float64)
    b64 = torch.randn(shape[1], generator=g, dtype=torch.float64)
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    x, dy = x64.to(dtype), dy64.to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    if channel_slice:  # a view of the first half of a tensor with twice the channels: neither NCHW nor channels-last
        x = torch.cat([x, torch.full_like(x, 1e3)], 1)[:, :shape[1]]
    x.requires_grad_(True)
    w, b = w64.float().requires_grad_(True), b64.float().requires_grad_(True)
    assert gn.fused_available(x)
    y = gn.group_norm_silu(x, w, b, groups, 1e-6)
    y.backward(dy)
    # the reference sees the very values the kernels saw (x rounded to `dtype`), in float64
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    yr = reference(xr, wr, br, groups, 1e-6)
    yr.backward(dy.double())
    rel = lambda a, r: float((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max())  # noqa: E731
    return {"y": rel(y, yr), "dx": rel(x.grad, xr.grad), "dweight": rel(w.grad, wr.grad), "dbias": rel(b.grad, br.grad),
            "strides": channel_slice or (y.stride() == x.stride() and x.grad.stride() == x.stride()),
            "dtype": y.dtype == dtype and x.grad.dtype == dtype}


def with_settings(settings, *args, **kwargs):
    """errors() under other values of common.group_norm's tiling settings, e.g. {"CHANNEL_SPLIT": False}."""
    before = {k: getattr(gn, k) for k in settings}
    for k, v in settings.items():
        setattr(gn, k, v)
    try:
        return errors(*args, **kwargs)
    finally:
        for k, v in before.items():
            setattr(gn, k, v)


def fused_vae():
    """A tiny AutoencoderKL fused and unfused (same weights): outputs and gradients, the count of fused pairs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4)
    x = torch.randn(2, 1, 8, 12)
    out = vae(x, sample_posterior=False).sample
    out.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in vae.named_parameters()}
    keys = list(vae.state_dict())
    vae.zero_grad()
    count = gn.fuse_group_norm_silu(vae)
    fused = vae(x, sample_posterior=False).sample
    fused.square().mean().backward()
    return {"count": count, "same_keys": list(vae.state_dict()) == keys,
            "kinds": sorted({type(m).__name__ for m in vae.modules() if "Norm" in type(m).__name__}),
            "out": float((fused - out).abs().max() / out.abs().max()),
            # the attention's key bias cancels in the softmax: its gradient is rounding (~1e-10), left out
            "grad": max(float((p.grad - grads[k]).abs().max() / grads[k].abs().max())
                        for k, p in vae.named_parameters() if grads[k].abs().max() > 1e-7)}


def compiled_channels_last():
    """The operators under torch.compile (AOT autograd with fake tensors, as Inductor traces them) on a channels-last
    input: the largest errors against eager, and whether the output and the input's gradient stayed channels-last."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    dy = torch.randn(2, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    fn = lambda x, w, b: gn.group_norm_silu(x, w, b, 4, 1e-6) * 2  # noqa: E731
    out = {}
    for name, run in (("eager", fn), ("compiled", torch.compile(fn, backend="aot_eager", fullgraph=True))):
        x.grad = w.grad = b.grad = None
        y = run(x, w, b)
        y.backward(dy)
        out[name] = (y.detach(), x.grad, w.grad, b.grad)
    return {"err": max(float((c - e).abs().max()) for c, e in zip(out["compiled"], out["eager"])),
            "channels_last": all(t.is_contiguous(memory_format=torch.channels_last) for t in out["compiled"][:2])}


if __name__ == "__main__":
    cases = {
        "nchw_fp32": errors((2, 12, 5, 7), 3, torch.float32, False),  # 16 padded channels, 9 tiles, last partial
        "channels_last_fp32": errors((2, 12, 5, 7), 3, torch.float32, True),
        "offset_mean_fp32": errors((2, 8, 9, 9), 2, torch.float32, False, offset=100.0),  # variance beside mean 100
        "one_row_fp32": errors((1, 6, 1, 50), 6, torch.float32, False),  # a group per channel, H = 1
        # tiles of 16 of the 48 channels (CHANNEL_SPLIT), or of all of them (64 lanes, 48 valid)
        "split_channels_last_fp32": with_settings({"CHANNEL_SPLIT": True}, (2, 48, 3, 5), 16, torch.float32, True),
        "split_nchw_fp32": with_settings({"CHANNEL_SPLIT": True}, (2, 48, 3, 5), 16, torch.float32, False),
        "unsplit_channels_last_fp32": with_settings({"CHANNEL_SPLIT": False}, (2, 48, 3, 5), 16, torch.float32, True),
        # programs with the samples fastest instead of in memory order (3 channel tiles, 2 pixel tiles, 3 samples)
        "sample_order_channels_last_fp32": with_settings({"MEMORY_ORDER": False, "TILE_ELEMENTS": 128},
                                                         (3, 48, 3, 5), 16, torch.float32, True),
        "sample_order_nchw_fp32": with_settings({"MEMORY_ORDER": False, "TILE_ELEMENTS": 128},
                                                (3, 48, 3, 5), 16, torch.float32, False),
        "memory_order_channels_last_fp32": with_settings({"TILE_ELEMENTS": 128}, (3, 48, 3, 5), 16, torch.float32,
                                                         True),
        "memory_order_nchw_fp32": with_settings({"TILE_ELEMENTS": 128}, (3, 48, 3, 5), 16, torch.float32, False),
        "channel_slice_fp32": errors((2, 12, 5, 7), 3, torch.float32, False, channel_slice=True),
        "nchw_bf16": errors((2, 12, 5, 7), 4, torch.bfloat16, False),
        "channels_last_bf16": errors((2, 12, 5, 7), 4, torch.bfloat16, True),
    }
    print(json.dumps({"cases": cases, "vae": fused_vae(), "compiled": compiled_channels_last()}))
