"""GroupNorm followed by SiLU in two Triton kernels forward and two backward, for the VAEs' resnet blocks.

Every resnet block of a diffusers `AutoencoderKL` runs `GroupNorm -> SiLU` twice. PyTorch and Inductor compute a
group norm as several reductions and elementwise passes, and under bf16 autocast in float32. Here one pass reads the
input for per-channel statistics of each tile, a few small ops merge them into each group's mean and variance
(Chan's parallel formula, so a large mean does not cancel the variance away), and a second pass normalises, applies
the affine and the SiLU and writes the output in the input's dtype. The backward recomputes the normalised input
instead of saving it. That is two reads and a write forward and four reads and a write backward, in any layout
(NCHW or channels-last: the kernels take strides). Arithmetic is float32 throughout.

    vae = AutoencoderKL(...)
    fuse_group_norm_silu(vae)   # in place, before the optimizer is built; same parameters, same state dict

On tensors that are not on a CUDA GPU, `GroupNormSiLU` runs `F.silu(F.group_norm(...))`, so a model fused here
still runs (and exports) anywhere. With TRITON_INTERPRET=1 set before the import, the kernels run on CPU tensors
through Triton's interpreter: that is how the tests check them against PyTorch without a GPU.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # no Triton (a CPU-only torch build): the module falls back to PyTorch's ops
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TILE_ELEMENTS = 4096  # elements a program handles: all channels of BLOCK_HW pixels


def kernels_run_on(device):
    """True when tensors on `device` take the Triton kernels: a CUDA GPU, or the CPU under the interpreter."""
    device = torch.device(device)
    return triton is not None and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def fused_available(x):
    """True when `x` takes the Triton kernels: a 4D tensor on a device where they run, with offsets that fit in the
    kernels' 32-bit arithmetic."""
    return x.dim() == 4 and x.numel() < 2**31 and kernels_run_on(x.device)


if triton is not None:

    @triton.jit
    def _tile(n, hw0, HW, C, s_n, s_c, s_hw, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets and mask of the tile of sample n: pixels hw0.. hw0+BLOCK_HW (rows) x every channel (columns)."""
        hw = hw0 + tl.arange(0, BLOCK_HW)
        c = tl.arange(0, BLOCK_C)
        mask = (hw[:, None] < HW) & (c[None, :] < C)
        return n * s_n + hw[:, None] * s_hw + c[None, :] * s_c, mask, c

    @triton.jit
    def _normalise(x, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G):
        """x -> (xhat, z = xhat * weight + bias) for one tile, with each channel's group statistics."""
        cmask = c < C
        group = n * G + c // CG
        mean = tl.load(mean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        return xhat, xhat * w[None, :] + b[None, :], w, rstd

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, C, s_n, s_c, s_hw,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per tile and channel: the mean and the sum of squared deviations (M2) over the tile's valid pixels."""
        n, blk = tl.program_id(0), tl.program_id(1)
        offs, mask, c = _tile(n, blk * BLOCK_HW, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(HW - blk * BLOCK_HW, BLOCK_HW).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        dev = tl.where(mask, x - mean[None, :], 0.0)
        out = (n * tl.num_programs(1) + blk) * C + c
        tl.store(mean_ptr + out, mean, mask=c < C)
        tl.store(m2_ptr + out, tl.sum(dev * dev, axis=0), mask=c < C)

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CG, G, s_n, s_c, s_hw,
                        BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = silu(xhat * weight + bias), written with x's strides and in y's dtype."""
        n, blk = tl.program_id(0), tl.program_id(1)
        offs, mask, c = _tile(n, blk * BLOCK_HW, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, z, _, _ = _normalise(x, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        y = z * tl.sigmoid(z)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_tile(x_ptr, dy_ptr, n, blk, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw,
                   BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """x and dy of one tile in float32 (their strides may differ), and the tile's mask."""
        offs, mask, _ = _tile(n, blk * BLOCK_HW, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        doffs, _, _ = _tile(n, blk * BLOCK_HW, HW, C, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + doffs, mask=mask, other=0.0).to(tl.float32)
        return x, dy, mask

    @triton.jit
    def _grad_z(x, dy, mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G):
        """The gradient at z = xhat * weight + bias (through the SiLU), recomputed from x and dy."""
        xhat, z, w, rstd = _normalise(x, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        s = tl.sigmoid(z)
        g = tl.where(mask, dy * s * (1.0 + z * (1.0 - s)), 0.0)
        return g, xhat, w, rstd

    # The offsets every store goes to are computed from scalars only, never from a helper that was handed a
    # pointer: torch.compile reads the kernels' stores to learn what they write, and would otherwise take every
    # pointer passed to such a helper (the input, the weight) for one that is written.

    @triton.jit
    def _backward_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr,
                              HW, C, CG, G, s_n, s_c, s_hw, d_n, d_c, d_hw,
                              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per tile and channel: sum(g * xhat) and sum(g), g the gradient at z."""
        n, blk = tl.program_id(0), tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        x, dy, mask = _load_tile(x_ptr, dy_ptr, n, blk, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
        g, xhat, _, _ = _grad_z(x, dy, mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        out = (n * tl.num_programs(1) + blk) * C + c
        tl.store(a_ptr + out, tl.sum(g * xhat, axis=0), mask=c < C)
        tl.store(bsum_ptr + out, tl.sum(g, axis=0), mask=c < C)

    @triton.jit
    def _backward_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, c1_ptr, c2_ptr,
                            HW, C, CG, G, s_n, s_c, s_hw, d_n, d_c, d_hw,
                            BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """dx = rstd * (g * weight - xhat * c1 - c2), c1 and c2 the group means of g * weight * xhat and g * weight."""
        n, blk = tl.program_id(0), tl.program_id(1)
        offs, mask, c = _tile(n, blk * BLOCK_HW, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x, dy, _ = _load_tile(x_ptr, dy_ptr, n, blk, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
        g, xhat, w, rstd = _grad_z(x, dy, mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        group = n * G + c // CG
        c1 = tl.load(c1_ptr + group, mask=c < C, other=0.0)
        c2 = tl.load(c2_ptr + group, mask=c < C, other=0.0)
        dx = rstd[None, :] * (g * w[None, :] - xhat * c1[None, :] - c2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    def _launch(kernel):
        """The kernel, wrapped so torch.compile can trace it (the interpreter's kernels launch as they are)."""
        return kernel if INTERPRET else wrap_triton(kernel)

    def _blocks(hw, c):
        block_c = triton.next_power_of_2(c)
        block_hw = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(hw)))
        return block_hw, block_c, triton.cdiv(hw, block_hw)

    def _flattens(t):
        """Whether the two spatial dims of a 4D tensor flatten into one pixel dim (NCHW or channels-last do)."""
        return t.shape[2] == 1 or t.stride(2) == t.stride(3) * t.shape[3]

    def _strides(t):
        """(sample, channel, pixel) strides of a 4D tensor whose spatial dims flatten."""
        assert _flattens(t), "the spatial dims must flatten (NCHW or channels-last)"
        return t.stride(0), t.stride(1), t.stride(3)

    def _dense(t):
        """t itself when its spatial dims flatten, else an NCHW copy."""
        return t if _flattens(t) else t.contiguous()

    @triton_op("common::group_norm_silu_forward", mutates_args={})
    def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        hw, cg = h * w, c // groups
        block_hw, block_c, nblk = _blocks(hw, c)
        strides = _strides(x)
        tile_mean = torch.empty(n, nblk, c, device=x.device, dtype=torch.float32)
        tile_m2 = torch.empty_like(tile_mean)
        _launch(_stats_kernel)[(n, nblk)](x, tile_mean, tile_m2, hw, c, *strides, BLOCK_HW=block_hw,
                                           BLOCK_C=block_c)
        # Chan et al.: merge the (tile, channel) pieces of each group, weighted by their pixel counts
        counts = torch.full((nblk,), float(block_hw), device=x.device)
        counts[-1] = hw - block_hw * (nblk - 1)
        counts = counts.view(1, nblk, 1, 1)
        tile_mean, tile_m2 = tile_mean.view(n, nblk, groups, cg), tile_m2.view(n, nblk, groups, cg)
        mean = (tile_mean * counts).sum((1, 3)) / (hw * cg)
        m2 = tile_m2.sum((1, 3)) + (counts * (tile_mean - mean[:, None, :, None]) ** 2).sum((1, 3))
        rstd = torch.rsqrt(m2 / (hw * cg) + eps)
        y = torch.empty_like(x)
        _launch(_forward_kernel)[(n, nblk)](x, y, mean, rstd, weight, bias, hw, c, cg, groups, *strides,
                                             BLOCK_HW=block_hw, BLOCK_C=block_c)
        return y, mean, rstd

    @triton_op("common::group_norm_silu_backward", mutates_args={})
    def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        hw, cg = h * w, c // groups
        block_hw, block_c, nblk = _blocks(hw, c)
        strides, dy_strides = _strides(x), _strides(dy)
        sum_a = torch.empty(n, nblk, c, device=x.device, dtype=torch.float32)
        sum_b = torch.empty_like(sum_a)
        _launch(_backward_sums_kernel)[(n, nblk)](x, dy, mean, rstd, weight, bias, sum_a, sum_b, hw, c, cg, groups,
                                                   *strides, *dy_strides, BLOCK_HW=block_hw, BLOCK_C=block_c)
        sum_a, sum_b = sum_a.sum(1), sum_b.sum(1)  # (n, c)
        c1 = (sum_a * weight.float()).view(n, groups, cg).sum(-1) / (hw * cg)
        c2 = (sum_b * weight.float()).view(n, groups, cg).sum(-1) / (hw * cg)
        dx = torch.empty_like(x)
        _launch(_backward_dx_kernel)[(n, nblk)](x, dy, dx, mean, rstd, weight, bias, c1, c2, hw, c, cg, groups,
                                                 *strides, *dy_strides, BLOCK_HW=block_hw, BLOCK_C=block_c)
        return dx, sum_a.sum(0).to(weight.dtype), sum_b.sum(0).to(bias.dtype)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, groups, _ = inputs
        _, mean, rstd = output
        ctx.groups = groups
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def _autograd_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _backward(_dense(dy), x, weight, bias, mean, rstd, ctx.groups)
        return dx, dweight, dbias, None, None

    _forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def group_norm_silu(x, weight, bias, groups, eps=1e-5):
    """silu(group_norm(x)) of a 4D tensor: the Triton kernels where `fused_available(x)`, else PyTorch's ops."""
    if not fused_available(x):
        return F.silu(F.group_norm(x, groups, weight, bias, eps))
    return _forward(_dense(x), weight, bias, groups, eps)[0]


class GroupNormSiLU(nn.GroupNorm):
    """`nn.GroupNorm` (affine) followed by SiLU: the same parameters and state-dict keys, one fused op."""

    def forward(self, x):
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps)


def _fused(norm):
    fused = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, affine=True)
    fused.weight, fused.bias = norm.weight, norm.bias  # the same Parameters: optimizer and EMA see no change
    return fused


def fuse_group_norm_silu(model):
    """Replace every `GroupNorm -> SiLU` pair of a diffusers VAE's blocks by `GroupNormSiLU`, in place; returns how
    many were fused. Covers `ResnetBlock2D` without a time-embedding projection (its `nonlinearity` then runs only
    right after the two norms; "scale_shift" blocks put an affine between norm2 and it, and are left alone) and the
    encoder's and decoder's `conv_norm_out -> conv_act`. Anything else is left as it is."""
    fusable = lambda m: type(m) is nn.GroupNorm and m.affine  # noqa: E731
    count = 0
    for module in model.modules():
        if (hasattr(module, "norm1") and hasattr(module, "norm2") and isinstance(module.nonlinearity, nn.SiLU)
                and getattr(module, "time_emb_proj", None) is None
                and getattr(module, "time_embedding_norm", "default") != "scale_shift"
                and fusable(module.norm1) and fusable(module.norm2)):
            module.norm1, module.norm2, module.nonlinearity = _fused(module.norm1), _fused(module.norm2), nn.Identity()
            count += 2
        elif (hasattr(module, "conv_norm_out") and isinstance(getattr(module, "conv_act", None), nn.SiLU)
              and fusable(module.conv_norm_out)):
            module.conv_norm_out, module.conv_act = _fused(module.conv_norm_out), nn.Identity()
            count += 1
    return count
