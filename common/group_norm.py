"""GroupNorm followed by SiLU in Triton kernels, for the VAEs' resnet blocks.

Every resnet block of a diffusers `AutoencoderKL` runs `GroupNorm -> SiLU` twice. PyTorch and Inductor compute a
group norm as several reductions and elementwise passes, and under bf16 autocast in float32. Here one pass reads the
input for per-channel statistics of each tile, a small kernel merges them into each group's mean and variance
(Chan's parallel formula, so a large mean does not cancel the variance away), and a second pass normalises, applies
the affine and the SiLU and writes the output in the input's dtype. The backward recomputes the normalised input
instead of saving it. That is two reads and a write forward and four reads and a write backward, in any layout
(NCHW or channels-last: the kernels take strides). Arithmetic is float32 throughout.

    vae = AutoencoderKL(...)
    fuse_group_norm_silu(vae)   # in place, before the optimizer is built; same parameters, same state dict

The forward and the backward are custom operators that torch.compile calls as they are, in whatever layout its
graph holds the tensor (they are tagged `flexible_layout`): a compiled step that keeps its convolutions
channels-last passes channels-last tensors, with no copies to NCHW around each norm.

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
except ImportError:  # no Triton (a CPU-only torch build): the module falls back to PyTorch's ops
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TILE_ELEMENTS = 4096  # elements a program handles: BLOCK_HW pixels of BLOCK_C channels
NUM_WARPS = 4  # warps of each tile's program
CHANNEL_SPLIT = True  # tiles of a power-of-two share of the channels (see _blocks)
MERGE_ROWS = 64  # tiles a merging program reads at a time
# Programs run in the order of the tensor's memory: in channels-last, the tiles of one pixel range's channels run
# side by side, so a pixel's channels are read from DRAM once (with the samples outermost, each channel tile would
# fetch the whole of each pixel's cache lines again, long after the others evicted them).
MEMORY_ORDER = True


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
    def _tile(n, hw0, c0, HW, C, s_n, s_c, s_hw, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets and mask of the tile of sample n: pixels hw0.. hw0+BLOCK_HW (rows) x channels c0.. c0+BLOCK_C
        (columns)."""
        hw = hw0 + tl.arange(0, BLOCK_HW)
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (hw[:, None] < HW) & (c[None, :] < C)
        return n * s_n + hw[:, None] * s_hw + c[None, :] * s_c, mask, c

    @triton.jit
    def _program(N, NBLK, NC, ORDER: tl.constexpr):
        """(sample, pixel tile, channel tile) of this program of the flat grid. ORDER 1: channel tiles fastest, then
        pixel tiles (channels-last memory order); 2: pixel tiles fastest, then channel tiles (NCHW order); 0: samples
        fastest (the order that MEMORY_ORDER = False keeps)."""
        pid = tl.program_id(0)
        if ORDER == 1:
            cb, blk, n = pid % NC, (pid // NC) % NBLK, pid // (NC * NBLK)
        elif ORDER == 2:
            blk, cb, n = pid % NBLK, (pid // NBLK) % NC, pid // (NBLK * NC)
        else:
            n, blk, cb = pid % N, (pid // N) % NBLK, pid // (N * NBLK)
        return n, blk, cb

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
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, C, s_n, s_c, s_hw, N, NBLK, NC,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ORDER: tl.constexpr):
        """Per tile and channel: the mean and the sum of squared deviations (M2) over the tile's valid pixels."""
        n, blk, cb = _program(N, NBLK, NC, ORDER)
        c0 = cb * BLOCK_C
        offs, mask, c = _tile(n, blk * BLOCK_HW, c0, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(HW - blk * BLOCK_HW, BLOCK_HW).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        dev = tl.where(mask, x - mean[None, :], 0.0)
        out = (n * NBLK + blk) * C + c
        tl.store(mean_ptr + out, mean, mask=c < C)
        tl.store(m2_ptr + out, tl.sum(dev * dev, axis=0), mask=c < C)

    @triton.jit
    def _group_tiles(part_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
        """Rows blk0.. blk0+BLOCK_P of the per-tile, per-channel values of group g of sample n, as (values, mask,
        tile index): a block of the (tile, channel) table that the first pass of each direction writes."""
        blk = blk0 + tl.arange(0, BLOCK_P)
        j = tl.arange(0, BLOCK_CG)
        mask = (blk[:, None] < NBLK) & (j[None, :] < CG)
        offs = (n * NBLK + blk[:, None]) * C + g * CG + j[None, :]
        return tl.load(part_ptr + offs, mask=mask, other=0.0), mask, blk

    @triton.jit
    def _merge_stats_kernel(tile_mean_ptr, tile_m2_ptr, mean_ptr, rstd_ptr, NBLK, HW, C, CG, G, eps,
                            BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
        """One program per (sample, group): Chan's merge of the tiles' per-channel means and M2 into the group's
        mean and 1 / std, each tile weighted by its count of valid pixels."""
        pid = tl.program_id(0)
        n, g = pid // G, pid % G
        total = HW * CG
        acc = tl.zeros((BLOCK_P, BLOCK_CG), tl.float32)
        for blk0 in range(0, NBLK, BLOCK_P):
            tile_mean, _, blk = _group_tiles(tile_mean_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P, BLOCK_CG)
            count = tl.minimum(HW - blk * BLOCK_HW, BLOCK_HW).to(tl.float32)
            acc += tile_mean * count[:, None]
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros((BLOCK_P, BLOCK_CG), tl.float32)
        for blk0 in range(0, NBLK, BLOCK_P):
            tile_mean, mask, blk = _group_tiles(tile_mean_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P, BLOCK_CG)
            tile_m2, _, _ = _group_tiles(tile_m2_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P, BLOCK_CG)
            count = tl.minimum(HW - blk * BLOCK_HW, BLOCK_HW).to(tl.float32)
            dev = tl.where(mask, tile_mean - mean, 0.0)
            acc += tile_m2 + count[:, None] * dev * dev
        m2 = tl.sum(tl.sum(acc, axis=1), axis=0)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, tl.math.rsqrt(m2 / total + eps))

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CG, G, s_n, s_c, s_hw, N, NBLK, NC,
                        BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ORDER: tl.constexpr):
        """y = silu(xhat * weight + bias), written with x's strides and in y's dtype."""
        n, blk, cb = _program(N, NBLK, NC, ORDER)
        c0 = cb * BLOCK_C
        offs, mask, c = _tile(n, blk * BLOCK_HW, c0, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, z, _, _ = _normalise(x, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        y = z * tl.sigmoid(z)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_tile(x_ptr, dy_ptr, n, blk, c0, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw,
                   BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """x and dy of one tile in float32 (their strides may differ), and the tile's mask."""
        offs, mask, _ = _tile(n, blk * BLOCK_HW, c0, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        doffs, _, _ = _tile(n, blk * BLOCK_HW, c0, HW, C, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
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

    @triton.jit
    def _backward_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr,
                              HW, C, CG, G, s_n, s_c, s_hw, d_n, d_c, d_hw, N, NBLK, NC,
                              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ORDER: tl.constexpr):
        """Per tile and channel: sum(g * xhat) and sum(g), g the gradient at z."""
        n, blk, cb = _program(N, NBLK, NC, ORDER)
        c0 = cb * BLOCK_C
        c = c0 + tl.arange(0, BLOCK_C)
        x, dy, mask = _load_tile(x_ptr, dy_ptr, n, blk, c0, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
        g, xhat, _, _ = _grad_z(x, dy, mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        out = (n * NBLK + blk) * C + c
        tl.store(a_ptr + out, tl.sum(g * xhat, axis=0), mask=c < C)
        tl.store(bsum_ptr + out, tl.sum(g, axis=0), mask=c < C)

    @triton.jit
    def _merge_grads_kernel(tile_a_ptr, tile_b_ptr, w_ptr, sum_a_ptr, sum_b_ptr, c1_ptr, c2_ptr, NBLK, HW, C, CG, G,
                            BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
        """One program per (sample, group): the tiles' sums into per-channel sum(g * xhat) and sum(g) of the sample,
        and c1, c2: the group means of g * weight * xhat and of g * weight."""
        pid = tl.program_id(0)
        n, g = pid // G, pid % G
        acc_a = tl.zeros((BLOCK_P, BLOCK_CG), tl.float32)
        acc_b = tl.zeros((BLOCK_P, BLOCK_CG), tl.float32)
        for blk0 in range(0, NBLK, BLOCK_P):
            a, _, _ = _group_tiles(tile_a_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P, BLOCK_CG)
            b, _, _ = _group_tiles(tile_b_ptr, n, g, blk0, NBLK, C, CG, BLOCK_P, BLOCK_CG)
            acc_a += a
            acc_b += b
        sum_a, sum_b = tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)
        j = tl.arange(0, BLOCK_CG)
        jmask = j < CG
        w = tl.load(w_ptr + g * CG + j, mask=jmask, other=0.0).to(tl.float32)
        tl.store(sum_a_ptr + n * C + g * CG + j, sum_a, mask=jmask)
        tl.store(sum_b_ptr + n * C + g * CG + j, sum_b, mask=jmask)
        tl.store(c1_ptr + pid, tl.sum(sum_a * w, axis=0) / (HW * CG))
        tl.store(c2_ptr + pid, tl.sum(sum_b * w, axis=0) / (HW * CG))

    @triton.jit
    def _sum_samples_kernel(sum_a_ptr, sum_b_ptr, dw_ptr, db_ptr, N, C, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """dweight and dbias: the samples' per-channel sum(g * xhat) and sum(g) summed over the samples, both in one
        launch (two reductions would each cost a launch per norm), in a fixed order."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc_a = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        acc_b = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n[:, None] < N) & (c[None, :] < C)
            acc_a += tl.load(sum_a_ptr + n[:, None] * C + c[None, :], mask=mask, other=0.0)
            acc_b += tl.load(sum_b_ptr + n[:, None] * C + c[None, :], mask=mask, other=0.0)
        tl.store(dw_ptr + c, tl.sum(acc_a, axis=0).to(dw_ptr.dtype.element_ty), mask=c < C)
        tl.store(db_ptr + c, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=c < C)

    @triton.jit
    def _backward_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, c1_ptr, c2_ptr,
                            HW, C, CG, G, s_n, s_c, s_hw, d_n, d_c, d_hw, N, NBLK, NC,
                            BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ORDER: tl.constexpr):
        """dx = rstd * (g * weight - xhat * c1 - c2), c1 and c2 the group means of g * weight * xhat and g * weight."""
        n, blk, cb = _program(N, NBLK, NC, ORDER)
        c0 = cb * BLOCK_C
        offs, mask, c = _tile(n, blk * BLOCK_HW, c0, HW, C, s_n, s_c, s_hw, BLOCK_HW, BLOCK_C)
        x, dy, _ = _load_tile(x_ptr, dy_ptr, n, blk, c0, HW, C, s_n, s_c, s_hw, d_n, d_c, d_hw, BLOCK_HW, BLOCK_C)
        g, xhat, w, rstd = _grad_z(x, dy, mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, C, CG, G)
        group = n * G + c // CG
        c1 = tl.load(c1_ptr + group, mask=c < C, other=0.0)
        c2 = tl.load(c2_ptr + group, mask=c < C, other=0.0)
        dx = rstd[None, :] * (g * w[None, :] - xhat * c1[None, :] - c2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    def _blocks(x, cg):
        """Tile and grid sizes of the (dense) tensor x: a tile is BLOCK_HW pixels of BLOCK_C channels, all of them,
        or with CHANNEL_SPLIT the largest power of two (16 or more) that divides the channel count, so that no lane
        is masked off. Returns BLOCK_HW, the number of pixel tiles, the flat grid, and the tile kernels' sizes."""
        n, c, h, w = x.shape
        hw = h * w
        block_c = triton.next_power_of_2(c)
        if CHANNEL_SPLIT and c & -c >= 16:
            block_c = c & -c
        block_hw = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(hw)))
        nblk, nc = triton.cdiv(hw, block_hw), triton.cdiv(c, block_c)
        order = (1 if x.stride(1) == 1 and c > 1 else 2) if MEMORY_ORDER else 0
        tile = dict(N=n, NBLK=nblk, NC=nc, BLOCK_HW=block_hw, BLOCK_C=block_c, ORDER=order, num_warps=NUM_WARPS)
        merge = dict(BLOCK_P=min(MERGE_ROWS, triton.next_power_of_2(nblk)), BLOCK_CG=triton.next_power_of_2(cg))
        return block_hw, nblk, (n * nblk * nc,), tile, merge

    def _strides(t):
        """(sample, channel, pixel) strides of an NCHW or channels-last tensor."""
        return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)

    def _dense(t):
        """t itself when it is NCHW or channels-last, else an NCHW copy: the kernels write the output and the input's
        gradient with the input's strides, so any other layout torch.compile or a caller hands the operators (a
        padded row, a slice of the channels) is copied first."""
        dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        return t if dense else t.contiguous()

    _TAGS = (torch.Tag.flexible_layout,)

    @torch.library.custom_op("common::group_norm_silu_forward", mutates_args=(), tags=_TAGS)
    def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x)
        n, c, h, w = x.shape
        hw, cg = h * w, c // groups
        block_hw, nblk, grid, tile, merge = _blocks(x, cg)
        strides = _strides(x)
        tile_mean = torch.empty(n, nblk, c, device=x.device, dtype=torch.float32)
        tile_m2 = torch.empty_like(tile_mean)
        _stats_kernel[grid](x, tile_mean, tile_m2, hw, c, *strides, **tile)
        mean = torch.empty(n, groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _merge_stats_kernel[(n * groups,)](tile_mean, tile_m2, mean, rstd, nblk, hw, c, cg, groups, eps,
                                           BLOCK_HW=block_hw, **merge)
        y = torch.empty_like(x)
        _forward_kernel[grid](x, y, mean, rstd, weight, bias, hw, c, cg, groups, *strides, **tile)
        return y, mean, rstd

    @_forward.register_fake
    def _(x, weight, bias, groups, eps):
        stats = x.new_empty(x.shape[0], groups, dtype=torch.float32)
        return torch.empty_like(_dense(x)), stats, torch.empty_like(stats)

    @torch.library.custom_op("common::group_norm_silu_backward", mutates_args=(), tags=_TAGS)
    def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, dy = _dense(x), _dense(dy)
        n, c, h, w = x.shape
        hw, cg = h * w, c // groups
        block_hw, nblk, grid, tile, merge = _blocks(x, cg)
        strides, dy_strides = _strides(x), _strides(dy)
        tile_a = torch.empty(n, nblk, c, device=x.device, dtype=torch.float32)
        tile_b = torch.empty_like(tile_a)
        _backward_sums_kernel[grid](x, dy, mean, rstd, weight, bias, tile_a, tile_b, hw, c, cg, groups,
                                    *strides, *dy_strides, **tile)
        sum_a = torch.empty(n, c, device=x.device, dtype=torch.float32)
        sum_b = torch.empty_like(sum_a)
        c1 = torch.empty(n, groups, device=x.device, dtype=torch.float32)
        c2 = torch.empty_like(c1)
        _merge_grads_kernel[(n * groups,)](tile_a, tile_b, weight, sum_a, sum_b, c1, c2, nblk, hw, c, cg, groups,
                                           **merge)
        dx = torch.empty_like(x)
        _backward_dx_kernel[grid](x, dy, dx, mean, rstd, weight, bias, c1, c2, hw, c, cg, groups,
                                  *strides, *dy_strides, **tile)
        dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
        block_c = min(64, triton.next_power_of_2(c))
        _sum_samples_kernel[(triton.cdiv(c, block_c),)](sum_a, sum_b, dweight, dbias, n, c,
                                                        BLOCK_N=min(32, triton.next_power_of_2(n)), BLOCK_C=block_c)
        return dx, dweight, dbias

    @_backward.register_fake
    def _(dy, x, weight, bias, mean, rstd, groups):
        return torch.empty_like(_dense(x)), torch.empty_like(weight), torch.empty_like(bias)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, groups, _ = inputs
        _, mean, rstd = output
        ctx.groups = groups
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def _autograd_backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _backward(dy, x, weight, bias, mean, rstd, ctx.groups)
        return dx, dweight, dbias, None, None

    _forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def group_norm_silu(x, weight, bias, groups, eps=1e-5):
    """silu(group_norm(x)) of a 4D tensor: the Triton kernels where `fused_available(x)`, else PyTorch's ops."""
    if not fused_available(x):
        return F.silu(F.group_norm(x, groups, weight, bias, eps))
    return _forward(x, weight, bias, groups, eps)[0]


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
