"""Runs common.group_norm's Triton kernels through Triton's interpreter on the CPU (TRITON_INTERPRET=1 is set before
the import) against PyTorch's GroupNorm + SiLU, and prints the largest errors as JSON for test_group_norm.py.
Tiles of 64 elements, so that the small shapes here span several tiles with a partial last one.

    python tests/group_norm_probe.py          # the kernels against PyTorch, and a fused VAE against an unfused one
    python tests/group_norm_probe.py writes   # what torch.compile's analysis of each kernel finds it writes

torch.compile learns what a user-written Triton kernel writes by reading its Triton IR; where that analysis cannot
tell, it takes every tensor argument for written, and a weight that needs grad then stops the compilation. The
`writes` mode runs that analysis for a Hopper target (a stand-in driver: no GPU is needed to generate the IR).
"""

import json
import os
import sys

WRITES = sys.argv[1:] == ["writes"]
if not WRITES:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common.group_norm as gn  # noqa: E402

gn.TILE_ELEMENTS = 64


def reference(x, w, b, groups, eps):
    return F.silu(F.group_norm(x, groups, w, b, eps))


def errors(shape, groups, dtype, channels_last, offset=0.0):
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
            "strides": y.stride() == x.stride() and x.grad.stride() == x.stride(),
            "dtype": y.dtype == dtype and x.grad.dtype == dtype}


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


def kernel_writes():
    """{kernel: the arguments torch.compile's analysis finds written} at the mel VAE's smallest shape."""
    import triton
    from triton.backends.compiler import GPUTarget
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    class HopperTarget:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(HopperTarget())
    n, c, h, w, groups = 2, 48, 8, 16, 16
    x, dy = torch.randn(n, c, h, w), torch.randn(n, c, h, w)
    block_hw, block_c, nblk = gn._blocks(h * w, c)
    per_tile = lambda: torch.empty(n, nblk, c)  # noqa: E731
    per_group = lambda: torch.rand(n, groups)  # noqa: E731
    shape = dict(HW=h * w, C=c, BLOCK_HW=block_hw, BLOCK_C=block_c)
    strides = dict(zip(("s_n", "s_c", "s_hw"), gn._strides(x)))
    dy_strides = dict(zip(("d_n", "d_c", "d_hw"), gn._strides(dy)))
    params = dict(mean_ptr=per_group(), rstd_ptr=per_group(), w_ptr=torch.randn(c), b_ptr=torch.randn(c), CG=c // groups,
                  G=groups, **shape, **strides)
    calls = {
        gn._stats_kernel: dict(x_ptr=x, mean_ptr=per_tile(), m2_ptr=per_tile(), **shape, **strides),
        gn._forward_kernel: dict(x_ptr=x, y_ptr=torch.empty_like(x), **params),
        gn._backward_sums_kernel: dict(x_ptr=x, dy_ptr=dy, a_ptr=per_tile(), bsum_ptr=per_tile(), **params,
                                       **dy_strides),
        gn._backward_dx_kernel: dict(x_ptr=x, dy_ptr=dy, dx_ptr=torch.empty_like(x), c1_ptr=per_group(),
                                     c2_ptr=per_group(), **params, **dy_strides),
    }
    return {kernel.fn.__name__: sorted(dep.name for dep in identify_accessed_tensors(kernel, kwargs, {})
                                       .read_writes.writes)
            for kernel, kwargs in calls.items()}


if __name__ == "__main__" and WRITES:
    print(json.dumps(kernel_writes()))
elif __name__ == "__main__":
    cases = {
        "nchw_fp32": errors((2, 12, 5, 7), 3, torch.float32, False),  # 16 padded channels, 9 tiles, last partial
        "channels_last_fp32": errors((2, 12, 5, 7), 3, torch.float32, True),
        "offset_mean_fp32": errors((2, 8, 9, 9), 2, torch.float32, False, offset=100.0),  # variance beside mean 100
        "one_row_fp32": errors((1, 6, 1, 50), 6, torch.float32, False),  # a group per channel, H = 1
        "nchw_bf16": errors((2, 12, 5, 7), 4, torch.bfloat16, False),
        "channels_last_bf16": errors((2, 12, 5, 7), 4, torch.bfloat16, True),
    }
    print(json.dumps({"cases": cases, "vae": fused_vae()}))
