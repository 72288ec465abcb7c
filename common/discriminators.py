"""Discriminators. Each returns `(logits, feature_maps)`; `CombinedDiscriminator` runs several on the same input
and returns `(list_of_logits, list_of_feature_map_lists)`, the form `common.losses` consumes (DAC's layout).

Image: PatchGAN and its multi-scale form. Audio (waveforms (B, 1, T), for GAN vocoders and codecs): HiFi-GAN's
multi-period and multi-scale discriminators, UnivNet's multi-resolution spectrogram discriminator and DAC's
multi-band complex-STFT discriminator, combined by name in `build_audio_discriminator`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix), as used for the Stable Diffusion / taming VAE.

    Four-by-four convolutions; `n_layers` stride-2 stages; the output is a map of logits, one per overlapping
    patch (70x70 pixels for n_layers=3), so it works at any resolution. With ndf=64 and n_layers=3: 2.77M params (2,765,633).
    """

    def __init__(self, in_channels=3, ndf=64, n_layers=3, norm="batch"):
        super().__init__()
        norm_layer = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(32 if c % 32 == 0 else 1, c),
                      "none": lambda c: nn.Identity()}[norm]
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers.append(nn.Sequential(
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=norm == "none"),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(ndf * mult, 1, 4, 1, 1)
        self.apply(_init_weights)

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return self.head(x), features  # logits (B, 1, h, w)


def _init_weights(m):
    # pix2pix initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for norm scales.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Downsampled(nn.Module):
    """Run `inner` on the input average-pooled by `factor` (the multi-scale trick of pix2pixHD and MelGAN)."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        if self.factor > 1:
            x = F.avg_pool2d(x, self.factor, self.factor) if x.ndim == 4 else F.avg_pool1d(x, self.factor, self.factor)
        return self.inner(x)


class CombinedDiscriminator(nn.Module):
    """Several discriminators on the same input: returns the lists of their logits and feature-map lists."""

    def __init__(self, discriminators):
        super().__init__()
        self.discriminators = nn.ModuleList(discriminators)

    def forward(self, x):
        logits, features = [], []
        for d in self.discriminators:
            out, feats = d(x)
            logits.append(out)
            features.append(feats)
        return logits, features


IMAGE_DISCRIMINATORS = ("patchgan", "multiscale-patchgan")


def build_image_discriminator(kind="patchgan", in_channels=3, ndf=64, n_layers=3, norm="batch", num_scales=3):
    """`patchgan`: one NLayerDiscriminator; `multiscale-patchgan`: one per scale at 1x, 1/2x, 1/4x, ..."""
    if kind == "patchgan":
        return CombinedDiscriminator([NLayerDiscriminator(in_channels, ndf, n_layers, norm)])
    if kind == "multiscale-patchgan":
        return CombinedDiscriminator([
            Downsampled(NLayerDiscriminator(in_channels, ndf, n_layers, norm), 2**i) for i in range(num_scales)])
    raise ValueError(f"unknown discriminator '{kind}' (choose from {', '.join(IMAGE_DISCRIMINATORS)})")


# Audio discriminators. Every sub-discriminator maps a waveform (B, 1, T) to (logits, feature_maps): the feature
# maps are the LeakyReLU(0.1) activations after each convolution (the inputs of feature matching), the logits come
# from a final convolution without activation and are not among the feature maps.

LRELU_SLOPE = 0.1  # HiFi-GAN, UnivNet, BigVGAN and DAC all use 0.1
MPD_PERIODS = (2, 3, 5, 7, 11)  # HiFi-GAN: primes, so the sub-discriminators' inputs overlap as little as possible
MRD_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # (n_fft, hop, win): UnivNet / BigVGAN
STFT_WINDOW_LENGTHS = (2048, 1024, 512)  # DAC's complex-STFT discriminator, hop = window // 4
DAC_BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # fractions of the STFT bins


def _width(channels, width, multiple=8):
    """`channels * width` rounded to a multiple of `multiple` (at least one multiple), so scaled grouped
    convolutions keep whole groups and the others keep tensor-core-friendly widths."""
    return max(multiple, multiple * round(channels * width / multiple))


def _run_stack(convs, head, x):
    """Convolutions with LeakyReLU, then the logit head: (logits, [activation after each conv])."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        features.append(x)
    return head(x), features


class PeriodDiscriminator(nn.Module):
    """One sub-discriminator of HiFi-GAN's multi-period discriminator (MPD; Kong et al. 2020).

    The waveform is reflect-padded to a multiple of `period` and folded to (B, 1, T / period, period), so each
    column holds every period-th sample; (k, 1) convolutions then look along the columns only. Four strided
    stages (stride 3), one at stride 1, and a (3, 1) convolution to one channel, all weight-normalised.
    8.22M parameters with the default widths (the full MPD of periods 2, 3, 5, 7, 11: 41.1M).
    """

    def __init__(self, period, channels=(32, 128, 512, 1024, 1024), kernel_size=5, stride=3):
        super().__init__()
        self.period = period
        widths = (1, *channels)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (stride if i < len(channels) - 1 else 1, 1),
                                  padding=(kernel_size // 2, 0)))
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])))
        self.head = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), padding=(1, 0)))

    def fold(self, x):
        """(B, 1, T) -> (B, 1, ceil(T / period), period); the padding depends on T only, not on the values."""
        pad = -x.shape[-1] % self.period
        if pad:  # a static shape test, so torch.compile specialises on it rather than breaking the graph
            x = F.pad(x, (0, pad), mode="reflect")
        return x.reshape(x.shape[0], x.shape[1], -1, self.period)

    def forward(self, x):
        return _run_stack(self.convs, self.head, self.fold(x))  # logits (B, 1, T', period)


class ScaleDiscriminator(nn.Module):
    """One sub-discriminator of HiFi-GAN's multi-scale discriminator (MSD; Kong et al. 2020, after MelGAN's,
    Kumar et al. 2019): grouped 1-D convolutions straight on the waveform, 1 -> 128 (kernel 15), then kernel 41 at
    strides 2, 2, 4, 4, 1 (groups 4, 16, 16, 16, 16) up to 1024 channels, a kernel-5 convolution and a kernel-3
    head. Weight norm, or spectral norm on the full-rate copy (`use_spectral_norm=True`, as HiFi-GAN does).
    `width` scales the channels in multiples of 16 so every group stays whole.
    9.87M parameters with weight norm, 9.86M with spectral norm (the full MSD of three: 29.6M).
    """

    def __init__(self, use_spectral_norm=False, width=1.0):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        c = [_width(n, width, 16) for n in (128, 128, 256, 512, 1024, 1024, 1024)]
        # (in, out, kernel, stride, groups) per convolution
        layers = [(1, c[0], 15, 1, 1), (c[0], c[1], 41, 2, 4), (c[1], c[2], 41, 2, 16), (c[2], c[3], 41, 4, 16),
                  (c[3], c[4], 41, 4, 16), (c[4], c[5], 41, 1, 16), (c[5], c[6], 5, 1, 1)]
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(c_in, c_out, k, s, padding=k // 2, groups=g)) for c_in, c_out, k, s, g in layers)
        self.head = norm(nn.Conv1d(c[-1], 1, 3, padding=1))

    def forward(self, x):
        return _run_stack(self.convs, self.head, x)  # logits (B, 1, ~T / 64)


class Pooled(nn.Module):
    """Run `inner` on the input average-pooled `times` times with kernel 4, stride 2, padding 2: HiFi-GAN's MSD
    scales (1/2x and 1/4x). Each pooling maps T samples to T // 2 + 1."""

    def __init__(self, inner, times):
        super().__init__()
        self.inner, self.times = inner, times

    def pool(self, x):
        for _ in range(self.times):
            x = F.avg_pool1d(x, 4, 2, padding=2)
        return x

    def forward(self, x):
        return self.inner(self.pool(x))


def _stft(x, n_fft, hop_length, window, pad_left, pad_right):
    """Complex STFT of (B, 1, T) as real (B, 2, frames, bins), in float32 with autocast off: bf16 has too few
    mantissa bits for a spectrogram's dynamic range. Reflect padding, frames not centred."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x if x.dtype == torch.float64 else x.float()  # float64 stays, for exact gradient checks
        x = F.pad(x, (pad_left, pad_right), mode="reflect").squeeze(1)  # (B, T + pad)
        spec = torch.stft(x, n_fft, hop_length, window.shape[0], window.to(x.dtype), center=False,
                          return_complex=True)  # (B, bins, frames)
        return torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2 = real/imag, frames, bins)


class ResolutionDiscriminator(nn.Module):
    """One sub-discriminator of UnivNet's multi-resolution discriminator (MRD; Jang et al. 2021), in
    the form BigVGAN uses (Lee et al. 2023): the linear magnitude spectrogram (Hann window, reflect padding of
    (n_fft - hop) / 2 on each side, so T samples give T // hop frames) is read as a one-channel image
    (B, 1, bins, frames). Five weight-normalised convolutions: kernel (3, 9), three of them at stride (1, 2)
    (halving the frames, as in BigVGAN), then (3, 3), and a (3, 3) head to one channel.
    93.6K parameters at channels=32, whatever the resolution (three of them: 281K).
    """

    def __init__(self, n_fft, hop_length, win_length, channels=32):
        super().__init__()
        if (n_fft - hop_length) % 2 or win_length > n_fft:
            raise ValueError(f"need n_fft - hop_length even and win_length <= n_fft (got {n_fft}, {hop_length}, "
                             f"{win_length})")
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        strides = (1, 2, 2, 2, 1)
        kernels = ((3, 9),) * 4 + ((3, 3),)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(1 if i == 0 else channels, channels, k, (1, s), padding=(k[0] // 2, k[1] // 2)))
            for i, (k, s) in enumerate(zip(kernels, strides)))
        self.head = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def spectrogram(self, x):
        """(B, 1, T) -> float32 magnitudes (B, 1, n_fft // 2 + 1, T // hop_length)."""
        pad = (self.n_fft - self.hop_length) // 2
        spec = _stft(x, self.n_fft, self.hop_length, self.window, pad, pad)  # (B, 2, frames, bins)
        # The norm's gradient is defined as zero at a zero bin (digital silence), unlike sqrt(re^2 + im^2).
        return torch.linalg.vector_norm(spec, dim=1, keepdim=True).transpose(2, 3)

    def forward(self, x):
        return _run_stack(self.convs, self.head, self.spectrogram(x))  # logits (B, 1, bins, frames / 8)


class BandDiscriminator(nn.Module):
    """One sub-discriminator of DAC's multi-band complex-STFT discriminator (Kumar et al. 2023, "High-Fidelity Audio
    Compression with Improved RVQGAN").

    The complex STFT (Hann window of `window_length`, hop window_length // 4, T samples give ceil(T / hop)
    frames) enters as two channels (real, imaginary), (B, 2, frames, bins), and is split along frequency into
    `bands` (fractions of the bins). Each band has its own stack of five weight-normalised convolutions (kernel
    (3, 9), three at stride (1, 2) along frequency, then (3, 3)); the band outputs are concatenated along
    frequency and a (3, 3) convolution gives the logits. Feature maps: the five activations of each band in turn.
    471K parameters at channels=32, whatever the window (three of them: 1.41M).
    """

    def __init__(self, window_length, channels=32, bands=DAC_BANDS):
        super().__init__()
        self.window_length, self.hop_length = window_length, window_length // 4
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
        strides = (1, 2, 2, 2, 1)
        kernels = ((3, 9),) * 4 + ((3, 3),)
        self.band_convs = nn.ModuleList(
            nn.ModuleList(
                weight_norm(nn.Conv2d(2 if i == 0 else channels, channels, k, (1, s),
                                      padding=(k[0] // 2, k[1] // 2)))
                for i, (k, s) in enumerate(zip(kernels, strides)))
            for _ in self.bands)
        self.head = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def spectrogram(self, x):
        """(B, 1, T) -> float32 (B, 2, ceil(T / hop), window_length // 2 + 1)."""
        # (window - hop) / 2 on the left, as much again plus up to the next multiple of the hop on the right:
        # frame i is centred on the stretch i * hop ... (i + 1) * hop, and every sample falls in some frame.
        right = -x.shape[-1] % self.hop_length
        pad = (self.window_length - self.hop_length) // 2
        return _stft(x, self.window_length, self.hop_length, self.window, pad, pad + right)

    def forward(self, x):
        spec = self.spectrogram(x)
        features, outputs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            band = spec[..., lo:hi]  # (B, 2, frames, hi - lo)
            for conv in convs:
                band = F.leaky_relu(conv(band), LRELU_SLOPE)
                features.append(band)
            outputs.append(band)
        return self.head(torch.cat(outputs, dim=-1)), features  # logits (B, 1, frames, ~bins / 8)


def multi_period_discriminators(width=1.0, periods=MPD_PERIODS):
    """HiFi-GAN's MPD as a list of sub-discriminators (41.1M parameters at width 1)."""
    channels = tuple(_width(c, width) for c in (32, 128, 512, 1024, 1024))
    return [PeriodDiscriminator(p, channels) for p in periods]


def multi_scale_discriminators(width=1.0, spectral_norm_first=False):
    """HiFi-GAN's MSD at 1x, 1/2x and 1/4x (29.6M parameters at width 1).

    HiFi-GAN puts spectral norm on the full-rate copy; here all three use weight norm unless
    `spectral_norm_first`. Spectral norm's power iteration advances at every forward pass, so with it a step's
    result would depend on how its batch is split into accumulated micro-batches (and on the generator's
    forward pass through the frozen discriminator); with weight norm, k micro-batches of b give exactly the
    update of one batch of k*b."""
    return [ScaleDiscriminator(use_spectral_norm=spectral_norm_first, width=width),
            Pooled(ScaleDiscriminator(width=width), 1), Pooled(ScaleDiscriminator(width=width), 2)]


AUDIO_DISCRIMINATORS = ("hifigan", "bigvgan", "dac")


def build_audio_discriminator(kind="hifigan", width=1.0):
    """The waveform discriminator of a published recipe, as one `CombinedDiscriminator` over (B, 1, T).

    `width` multiplies every channel count (rounded to multiples of 8, of 16 in the grouped MSD convolutions) to
    set the generator:discriminator parameter ratio; 1.0 gives the papers' sizes.

    hifigan  MPD (periods 2, 3, 5, 7, 11) + MSD (1x, 1/2x, 1/4x); Kong et al. 2020. 8 sub-discriminators,
             70.7M parameters (41.1M + 29.6M); 17.7M at width 0.5.
    bigvgan  MPD + MRD (three STFT resolutions); Lee et al. 2023, after UnivNet (Jang et al. 2021).
             8 sub-discriminators, 41.4M parameters; 10.4M at width 0.5.
    dac      MPD + MSD + multi-band complex-STFT discriminator (windows 2048, 1024, 512); Kumar et al. 2023.
             11 sub-discriminators, 72.1M parameters; 18.1M at width 0.5. (DAC's released configuration sets
             no MSD rates, so trains MPD + multi-band only.)
    """
    if kind not in AUDIO_DISCRIMINATORS:
        raise ValueError(f"unknown audio discriminator '{kind}' (choose from {', '.join(AUDIO_DISCRIMINATORS)})")
    discriminators = multi_period_discriminators(width)
    if kind in ("hifigan", "dac"):
        discriminators += multi_scale_discriminators(width)
    if kind == "bigvgan":
        discriminators += [ResolutionDiscriminator(*r, channels=_width(32, width)) for r in MRD_RESOLUTIONS]
    if kind == "dac":
        discriminators += [BandDiscriminator(w, channels=_width(32, width)) for w in STFT_WINDOW_LENGTHS]
    return CombinedDiscriminator(discriminators)
