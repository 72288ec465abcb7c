"""Text-conditioned denoisers for latent diffusion: a DiT with cross-attention, and diffusers' UNet2DConditionModel.

Every denoiser has one forward, whatever its family:

    model(x, t, context, context_mask) -> prediction shaped like x
    x (B, C, H, W): latents of any aspect ratio (audio mel latents are long and thin; a waveform VAE's latents are
      one row, H = 1, for a DiT with patch_size [1, p]); H and W multiples of `denoiser_downsampling(config)`.
    t (B,): timesteps in [0, 1000], float or integer. context (B, L, context_dim): text-encoder hidden states, any
      L. context_mask (B, L) bool, True = a real token.

A model is rebuilt from its JSON-able `model.config` by `build_denoiser`, so an export is config.json +
model.safetensors. Presets are named in DENOISER_PRESETS; `denoiser_config(preset, in_channels, context_dim)` turns
one into a config.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclasses.dataclass(frozen=True)
class DiTPreset:
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    family: str = "dit"


@dataclasses.dataclass(frozen=True)
class UNetPreset:
    block_out_channels: tuple
    layers_per_block: int = 2
    # diffusers' name; it is really the number of heads per attention layer (each head gets channels // heads).
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    family: str = "unet"


# Parameter counts with context_dim 768 and 4 latent channels (tested for dit-45m and unet-45m).
DENOISER_PRESETS = {
    "dit-tiny": DiTPreset(hidden_size=32, depth=2, num_heads=2),  # tests: 92,848
    "dit-s": DiTPreset(hidden_size=192, depth=12, num_heads=3),  # 11,535,568
    "dit-45m": DiTPreset(hidden_size=384, depth=12, num_heads=6),  # 45,631,888: the default
    "dit-b": DiTPreset(hidden_size=768, depth=12, num_heads=12),  # 181,506,832
    "unet-tiny": UNetPreset(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                            norm_num_groups=8),  # tests: 1,028,484
    # 45,558,580. With diffusers' default of 8 heads the same UNet has 48,188,804 parameters. 40 "heads" is the one
    # single value that comes within 0.01M of the 45.55M reference: diffusers then gives heads of 3, 4 and 6
    # channels (inner attention widths 120, 160, 240 instead of 128, 192, 256, as 40 does not divide the widths).
    "unet-45m": UNetPreset(block_out_channels=(128, 192, 256, 256), layers_per_block=2, attention_head_dim=40),
}

DIT_KEYS = ("in_channels", "out_channels", "context_dim", "hidden_size", "depth", "num_heads", "patch_size",
            "mlp_ratio", "qk_norm")
UNET_KEYS = ("in_channels", "out_channels", "context_dim", "block_out_channels", "layers_per_block",
             "attention_head_dim", "norm_num_groups", "down_block_types", "up_block_types")


def denoiser_config(preset, in_channels, context_dim, **overrides):
    """A preset as a JSON-able config dict (tuples as lists), with `overrides` applied (e.g. qk_norm=True, depth=16)."""
    if preset not in DENOISER_PRESETS:
        raise ValueError(f"unknown denoiser preset '{preset}' (choose from {', '.join(DENOISER_PRESETS)})")
    spec = dataclasses.asdict(DENOISER_PRESETS[preset])
    family = spec.pop("family")
    config = {"family": family, "in_channels": in_channels, "out_channels": in_channels, "context_dim": context_dim,
              **spec}
    if family == "unet":
        n = len(config["block_out_channels"])
        # diffusers' defaults for four blocks: cross-attention everywhere but at the lowest resolution.
        config["down_block_types"] = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
        config["up_block_types"] = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown {family} config keys {sorted(unknown)} (known: {', '.join(sorted(config))})")
    config.update(overrides)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def build_denoiser(config):
    """The model a config describes (freshly initialised); `model.config` is a copy of the config."""
    family = config.get("family")
    if family == "dit":
        return DiT(**{k: config[k] for k in DIT_KEYS})
    if family == "unet":
        return UNetDenoiser(**{k: config[k] for k in UNET_KEYS})
    raise ValueError(f"unknown denoiser family {family!r} (expected 'dit' or 'unet')")


def patch_shape(patch_size):
    """A DiT's patch_size as (along H, along W): an int p is a p x p patch, [ph, pw] a ph x pw one."""
    if isinstance(patch_size, int):
        return patch_size, patch_size
    ph, pw = patch_size
    return int(ph), int(pw)


def denoiser_downsampling(config):
    """(along H, along W): what the latents' height and width must be multiples of: the DiT's patch, or 2 per UNet
    downsampling in both."""
    if config["family"] == "dit":
        return patch_shape(config["patch_size"])
    f = 2 ** (len(config["block_out_channels"]) - 1)
    return f, f


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def denoiser_flops_per_sample(config, latent_shape, context_len):
    """Forward FLOPs (2 x multiply-adds) of one sample of latents `latent_shape` = (C, H, W) with `context_len`
    context tokens: every matmul, plus attention's scores and weighted values. Training costs ~3x this.

    DiT: analytic. UNet: counted by running the model on the meta device (shapes only, no memory, no compute)."""
    if config["family"] == "unet":
        return _meta_flops(config, latent_shape, context_len)
    _, height, width = latent_shape
    (ph, pw), D, depth = patch_shape(config["patch_size"]), config["hidden_size"], config["depth"]
    T, L, M = (height // ph) * (width // pw), context_len, int(D * config["mlp_ratio"])
    embed = (T * config["in_channels"] * ph * pw * D  # patchify
             + TIME_FREQ_DIM * D + D * D  # timestep MLP
             + L * (config["context_dim"] * D + D * D)  # context projection
             + 2 * D * D)  # pooled-text MLP
    block = (9 * D * D  # adaLN modulation
             + T * 3 * D * D + 2 * T * T * D + T * D * D  # self-attention: qkv, scores and values, output
             + T * D * D + L * 2 * D * D + 2 * T * L * D + T * D * D  # cross-attention: q, kv, scores and values, output
             + 2 * T * D * M)  # MLP
    final = 2 * D * D + T * D * ph * pw * config["out_channels"]
    return 2 * (embed + depth * block + final)


def _meta_flops(config, latent_shape, context_len):
    from common.perf import FlopCount

    with torch.device("meta"):
        model = build_denoiser(config)
        if config["family"] == "unet":  # the model's own FLOPs: attention heads at their size, not padded to 8
            from diffusers.models.attention_processor import AttnProcessor2_0

            model.unet.set_attn_processor(AttnProcessor2_0())
        x = torch.empty(1, *latent_shape)
        context = torch.empty(1, context_len, config["context_dim"])
        mask = torch.ones(1, context_len, dtype=torch.bool)
        t = torch.empty(1)
    with torch.no_grad(), FlopCount() as counter:
        model(x, t, context, mask)
    return counter.total


# ---------------------------------------------------------------------------------------------------------------
# DiT (Peebles & Xie 2023, arXiv:2212.09748) with text cross-attention

TIME_FREQ_DIM = 256  # DiT: the timestep's sinusoidal features before the MLP


def timestep_features(t, dim=TIME_FREQ_DIM, max_period=10000.0):
    """(B,) timesteps -> (B, dim) sinusoids at geometrically spaced frequencies (transformer positional style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device, dtype=torch.float32))
    angles = t.float()[:, None] * freqs  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sincos_2d(height, width, dim, device=None):
    """(height * width, dim) fixed positional embeddings of a grid, row-major: the first half of the channels
    encode the row index, the second half the column index, each as sinusoids at dim / 4 frequencies. Positions
    are absolute integer indices, so a long, thin grid is as well defined as a square one."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # (h, dim/4)
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs  # (w, dim/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    cols = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([rows, cols], dim=-1).reshape(height * width, dim)


def modulate(x, shift, scale):
    """adaLN: a per-sample affine map of normalised tokens. x (B, T, D); shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`. Self-attention projects q, k and v with one
    fused matmul; cross-attention projects q from the tokens and k, v (fused) from the context."""

    def __init__(self, dim, num_heads, cross=False, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim, self.cross = num_heads, dim // num_heads, cross
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        # RMSNorm of q and k per head bounds the attention logits, which otherwise can grow until softmax
        # saturates (a known source of loss spikes in large or long bf16 runs).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        B, T, D = x.shape
        H, hd = self.num_heads, self.head_dim
        if self.cross:
            L = context.shape[1]
            q = self.q(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k, v = self.kv(context).view(B, L, 2, H, hd).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        # The views keep head_dim contiguous (stride 1) and tokens at a fixed stride: the (B, T, H, hd) layout the
        # flash and memory-efficient kernels read natively, so no copy is made before the kernel.
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; each a pre-norm residual branch under adaLN-Zero.

    All three branches are modulated (shift, scale of the normalised input) and gated from the conditioning
    vector: nine vectors per block where PixArt-alpha uses six and a plain norm before its cross-attention. The
    gate lets the model weigh the text differently at different noise levels, and with every gate zero at init
    each block starts as the identity. It costs 3 x hidden^2 parameters per block and no per-token FLOPs.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        # The norms have no affine parameters: adaLN supplies the scale and shift.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads, cross=True, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 9 * dim)  # fed SiLU(c): shift, scale and gate of each branch

    def forward(self, x, cond, context, mask, has_text):
        """x (B, T, D); cond (B, D) = SiLU(c); context (B, L, D); mask (B, 1, 1, L) bool; has_text (B, 1)."""
        (shift1, scale1, gate1, shift2, scale2, gate2,
         shift3, scale3, gate3) = self.ada(cond).chunk(9, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        # A sample without any text token gets no cross-attention at all (its gate is zeroed).
        x = x + (gate2 * has_text)[:, None] * self.cross_attn(modulate(self.norm2(x), shift2, scale2), context, mask)
        return x + gate3[:, None] * self.mlp(modulate(self.norm3(x), shift3, scale3))


class DiT(nn.Module):
    """Diffusion transformer over latent patches, conditioned on the timestep and text.

    Patches (Conv2d, stride = patch; `patch_size` p is p x p, [ph, pw] is ph x pw, e.g. [1, 2] for one-row latents)
    + fixed 2-D sin-cos positions for the actual grid (so any aspect ratio works). Conditioning vector c = MLP(timestep sinusoids) + MLP(masked mean of the projected text tokens), so
    adaLN also sees the prompt; the projected tokens themselves are attended to in every block. The final layer
    (adaLN + linear) is zero-initialised, so the untrained model outputs exactly 0.

    Speed: at width 384 the norms, modulations and residual adds take about as long as the matmuls, and a step is
    many small kernels; train_ldm.py's --compile replays them as CUDA graphs (measured in README).
    """

    def __init__(self, in_channels, context_dim, hidden_size=384, depth=12, num_heads=6, patch_size=2,
                 mlp_ratio=4.0, qk_norm=False, out_channels=None):
        super().__init__()
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 and of num_heads {num_heads}")
        out_channels = out_channels or in_channels
        self.config = {"family": "dit", "in_channels": in_channels, "out_channels": out_channels,
                       "context_dim": context_dim, "hidden_size": hidden_size, "depth": depth,
                       "num_heads": num_heads, "patch_size": patch_size, "mlp_ratio": mlp_ratio, "qk_norm": qk_norm}
        self.patch, self.out_channels = patch_shape(patch_size), out_channels
        self.gradient_checkpointing = False
        D = hidden_size
        self.patch_embed = nn.Conv2d(in_channels, D, self.patch, stride=self.patch)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        # The text is projected to the model width once, not in every block; each block's k, v read the projection.
        self.context_embed = nn.Sequential(nn.Linear(context_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.pooled_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(D, 2 * D)
        self.final_proj = nn.Linear(D, self.patch[0] * self.patch[1] * out_channels)
        self._pos_cache = {}
        self._init_weights()

    def _init_weights(self):
        # DiT's initialisation: Xavier-uniform linears (the patch convolution as a linear map of a flattened
        # patch), N(0, 0.02) for the timestep MLP, zeros for every adaLN modulation and for the output layer.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.ada for b in self.blocks] + [self.final_ada, self.final_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def positions(self, h, w, device):
        """(h * w, D) positional embeddings of an h x w patch grid, computed once per grid shape and device."""
        D = self.config["hidden_size"]
        if torch.compiler.is_compiling():  # traced into the graph (cheap) rather than a cache compile must guard
            return sincos_2d(h, w, D, device)
        key = (h, w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(h, w, D, device)
        return self._pos_cache[key]

    def forward(self, x, t, context, context_mask=None):
        B, _, H, W = x.shape
        ph, pw = self.patch
        if H % ph or W % pw:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
        h, w = H // ph, W // pw
        in_dtype, dtype = x.dtype, self.patch_embed.weight.dtype
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        mask = context_mask.bool()  # (B, L)

        # contiguous(): the transposed view would otherwise set the layout of the whole residual stream (every add
        # keeps its first operand's strides), and each LayerNorm and residual add would then read it transposed.
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, T, D)
        tokens = tokens + self.positions(h, w, x.device).to(tokens.dtype)
        if t.ndim == 0:
            t = t.expand(B)
        c = self.time_embed(timestep_features(t).to(dtype))  # (B, D)

        # Masked tokens are zeroed right after the projection: nothing of them (not even a NaN in padding) reaches
        # the pooled vector or the keys and values.
        ctx = self.context_embed(context.to(dtype)).masked_fill(~mask[..., None], 0.0)  # (B, L, D)
        count = mask.sum(dim=1, keepdim=True)  # (B, 1)
        pooled = ctx.sum(dim=1) / count.clamp(min=1).to(ctx.dtype)  # (B, D); zero for a sample without text
        c = c + self.pooled_embed(pooled)
        has_text = (count > 0).to(ctx.dtype)  # (B, 1)
        # An all-False row of a boolean mask makes softmax 0/0 = NaN: such rows attend to every (zeroed) token
        # instead, and the block zeroes their cross-attention through has_text. No host sync either way.
        attn_mask = (mask | (count == 0))[:, None, None, :]  # (B, 1, 1, L)

        cond = F.silu(c)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond, ctx, attn_mask, has_text, use_reentrant=False)
            else:
                tokens = block(tokens, cond, ctx, attn_mask, has_text)

        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        out = self.final_proj(modulate(self.final_norm(tokens), shift, scale))  # (B, T, ph * pw * C)
        out = out.view(B, h, w, ph, pw, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, ph, w, pw)
        return out.reshape(B, self.out_channels, H, W).to(in_dtype)


# ---------------------------------------------------------------------------------------------------------------
# UNet: diffusers' UNet2DConditionModel (the Stable Diffusion layout) behind the same forward


class PaddedHeadAttnProcessor:
    """Attention for diffusers' `Attention` with each head zero-padded to a multiple of 8 channels: the same result.

    PyTorch's fused attention kernels (flash, cuDNN, memory-efficient) need head sizes that are multiples of 8 in
    bf16/fp16; anything else falls back to the math path, which materialises every (query, key) score. The 45M UNet
    preset has heads of 3, 4 and 6 channels (diffusers' `attention_head_dim` is the number of heads), so its
    self-attention over 32 x 32 latents fell back. Zero channels add nothing to q.k, and a zero channel of v gives a
    zero output channel that is cut off; the softmax scale stays 1/sqrt(true head size). Parameters and state dict
    are untouched, so checkpoints move freely between this processor and diffusers' own.

    Handles what UNet2DConditionModel's transformer blocks use: self- and cross-attention on (B, L, C) tokens with
    an optional additive mask. Anything else (spatial, group or q/k norms, 4-D inputs) is refused.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None
                or attn.norm_k is not None or hidden_states.ndim != 3):
            raise ValueError("PaddedHeadAttnProcessor handles token attention only (no spatial, group or q/k norms)")
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head = key.shape[-1] // attn.heads
        padded = -(-head // 8) * 8

        def heads(x):  # (B, L, heads * head) -> (B, heads, L, padded)
            x = x.view(batch, -1, attn.heads, head).transpose(1, 2)
            return F.pad(x, (0, padded - head)) if padded != head else x

        query, key, value = heads(query), heads(key), heads(value)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=head ** -0.5)
        out = out[..., :head].transpose(1, 2).reshape(batch, -1, attn.heads * head)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetDenoiser(nn.Module):
    """diffusers' UNet2DConditionModel, called as model(x, t, context, context_mask).

    diffusers turns `encoder_attention_mask` (1 = keep) into an additive bias of -10000 on masked keys: enough
    to give them exactly zero weight, but a sample whose tokens are all masked would attend to them uniformly.
    So masked hidden states are zeroed first: such a sample then attends to zero vectors, and its output does not
    depend on what the padding holds.
    """

    def __init__(self, in_channels, context_dim, block_out_channels=(128, 192, 256, 256), layers_per_block=2,
                 attention_head_dim=8, norm_num_groups=32, down_block_types=None, up_block_types=None,
                 out_channels=None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        n = len(block_out_channels)
        down_block_types = list(down_block_types or ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
        up_block_types = list(up_block_types or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
        out_channels = out_channels or in_channels
        self.config = {"family": "unet", "in_channels": in_channels, "out_channels": out_channels,
                       "context_dim": context_dim, "block_out_channels": list(block_out_channels),
                       "layers_per_block": layers_per_block, "attention_head_dim": attention_head_dim,
                       "norm_num_groups": norm_num_groups, "down_block_types": down_block_types,
                       "up_block_types": up_block_types}
        self.unet = UNet2DConditionModel(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, cross_attention_dim=context_dim, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types))
        self.pad_attention_heads()

    def pad_attention_heads(self):
        """Run every attention whose head size is not a multiple of 8 through PaddedHeadAttnProcessor."""
        processors = {}
        for name, processor in self.unet.attn_processors.items():
            attn = self.unet.get_submodule(name.rsplit(".", 1)[0])
            odd = (attn.inner_dim // attn.heads) % 8 != 0
            processors[name] = PaddedHeadAttnProcessor() if odd else processor
        self.unet.set_attn_processor(processors)

    @property
    def gradient_checkpointing(self):
        return self.unet.is_gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        if value:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self):
        self.unet.enable_xformers_memory_efficient_attention()

    def forward(self, x, t, context, context_mask=None):
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if context_mask is not None:
            keep = context_mask.bool()  # (B, L)
            context = context.masked_fill(~keep[..., None], 0.0)
            context_mask = keep.to(x.dtype)  # diffusers computes (1 - mask) * -10000 in x's dtype
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                         return_dict=False)[0]
