"""Audio VAEs as train_audio_vae.py trains them and train_ldm.py uses them: the presets, the mapping between audio
and the model's input, and the export.

Two modes share one interface (`AudioVAE`):

- `mel`: a diffusers `AutoencoderKL` over log-mel spectrograms, one input channel, (B, 1, n_mels, frames),
  downsampling time and frequency alike (the AudioLDM design). The log-mel is normalised by a mean and standard
  deviation measured on the training audio, saved with the model; a vocoder turns decoded mels into audio.
- `waveform`: a diffusers `AutoencoderOobleck` (Stable Audio's 1D convolutional VAE with Snake activations) on mono
  audio, (B, 1, samples).

An export is a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) with `audio_vae.json` (the
mode, the mel configuration, the normalisation) and `latent_stats.json` beside it:

    from common.audio_vae import load_audio_vae
    vae = load_audio_vae("out/audio_vae")
    z = vae.encode(audio).mean            # audio (B, T) at vae.sample_rate -> latents
    mel_or_audio = vae.decode(z)          # (B, n_mels, frames) log-mel, or (B, T) audio
"""

import dataclasses
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, AutoencoderOobleck

from common.spectral import MelConfig, MelSpectrogram

MODES = ("mel", "waveform")
FORMAT = "audio-vae-v1"
CONFIG_NAME = "audio_vae.json"


@dataclasses.dataclass(frozen=True)
class MelVAEPreset:
    """An AutoencoderKL over (1, n_mels, frames): each of the len(block_out_channels) - 1 down blocks halves both."""

    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int = 32
    mode: str = "mel"

    @property
    def time_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def freq_factor(self):
        return self.time_factor


@dataclasses.dataclass(frozen=True)
class WaveVAEPreset:
    """An AutoencoderOobleck over (1, samples): one latent frame per prod(downsampling_ratios) samples. Decoder
    widths are decoder_channels x (1, *channel_multiples), from the output up. diffusers ties the encoder's width
    to the latent: its widths are 2 x latent_channels x (1, *channel_multiples), so the encoder grows with
    --latent_channels (1.15M at 8 channels for wave-5m, 4.6M at 16)."""

    downsampling_ratios: tuple
    channel_multiples: tuple
    decoder_channels: int
    mode: str = "waveform"

    @property
    def time_factor(self):
        out = 1
        for r in self.downsampling_ratios:
            out *= r
        return out

    freq_factor = None


PRESETS = {
    # mel: 4x in time and frequency (80 bands x 256 frames -> 20 x 64 latents), the AudioLDM layout
    "mel-f4-5m": MelVAEPreset((48, 96, 192), 2, norm_num_groups=16),  # 4.65M decoder, 3.17M encoder
    "mel-f8-5m": MelVAEPreset((32, 64, 128, 160), 2),  # 8x: 4.12M decoder, 2.84M encoder
    "mel-tiny": MelVAEPreset((8, 16, 16), 1, norm_num_groups=4),  # tests
    # waveform: one latent frame per 256 samples (86 Hz at 22.05 kHz, the hop of the default mel) or per 1024
    "wave-5m": WaveVAEPreset((2, 4, 4, 8), (2, 4, 8, 16), 32),  # 4.57M decoder (32 -> 512 wide)
    "wave-5m-x1024": WaveVAEPreset((4, 4, 8, 8), (2, 4, 8, 16), 32),
    "wave-tiny": WaveVAEPreset((2, 4, 4, 8), (1, 2, 2, 2), 8),  # tests
}
DEFAULT_PRESET = {"mel": "mel-f4-5m", "waveform": "wave-5m"}


def build_vae(preset, latent_channels, sample_rate):
    """A freshly initialised diffusers model for `preset` (a PRESETS value)."""
    if preset.mode == "mel":
        n = len(preset.block_out_channels)
        return AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(preset.block_out_channels), layers_per_block=preset.layers_per_block,
            norm_num_groups=preset.norm_num_groups, sample_size=64)
    with warnings.catch_warnings():  # diffusers builds it with torch's legacy weight_norm, deprecated but working
        warnings.simplefilter("ignore", FutureWarning)
        return AutoencoderOobleck(
            encoder_hidden_size=2 * latent_channels, downsampling_ratios=list(preset.downsampling_ratios),
            channel_multiples=list(preset.channel_multiples), decoder_channels=preset.decoder_channels,
            decoder_input_channels=latent_channels, audio_channels=1, sampling_rate=sample_rate)


def vae_class(mode):
    return AutoencoderKL if mode == "mel" else AutoencoderOobleck


def fresh_copy(vae):
    """A new model of `vae`'s class and config holding its weights (AutoencoderOobleck's legacy weight norm
    cannot be deep-copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        copy = type(vae).from_config(vae.config)
    copy.load_state_dict(vae.state_dict())
    return copy.to(next(vae.parameters()).device)


def time_factor(vae):
    """Input frames (mel) or samples (waveform) per latent frame of a built diffusers model."""
    if hasattr(vae.config, "downsampling_ratios"):
        return int(torch.tensor(vae.config.downsampling_ratios).prod())
    return 2 ** (len(vae.config.block_out_channels) - 1)


class AudioVAE(nn.Module):
    """A trained audio VAE with what it needs to read audio: its mode, its mel configuration and (mel mode) the
    normalisation of the log-mel. `to_input(audio)` gives the VAE's input, `from_output(x)` the log-mel (mel
    mode) or waveform of a VAE output; `encode` / `decode` go from audio to latents and back to a log-mel or audio.
    """

    def __init__(self, vae, mode, mel_config, mel_mean=0.0, mel_std=1.0, config=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.vae, self.mode, self.mel_config = vae, mode, mel_config
        self.mel_mean, self.mel_std = float(mel_mean), float(mel_std)
        self.mel = MelSpectrogram(mel_config)
        self.config = config or {}

    @property
    def sample_rate(self):
        return self.mel_config.sample_rate

    @property
    def time_factor(self):
        return time_factor(self.vae)

    @property
    def latent_channels(self):
        # AutoencoderKL names it latent_channels; AutoencoderOobleck, decoder_input_channels
        config = self.vae.config
        return config.latent_channels if self.mode == "mel" else config.decoder_input_channels

    @property
    def samples_per_latent_frame(self):
        return self.time_factor * (self.mel_config.hop_length if self.mode == "mel" else 1)

    def normalize(self, log_mel):
        return (log_mel - self.mel_mean) / self.mel_std

    def denormalize(self, x):
        return x * self.mel_std + self.mel_mean

    def to_input(self, audio):
        """Audio (B, T) or (B, 1, T), T a multiple of `samples_per_latent_frame` -> the VAE's input."""
        audio = audio.reshape(-1, audio.size(-1))
        if self.mode == "mel":
            return self.normalize(self.mel(audio)).unsqueeze(1)  # (B, 1, n_mels, T / hop)
        return audio.unsqueeze(1)  # (B, 1, T)

    def from_output(self, x):
        """A VAE output -> log-mel (B, n_mels, frames) in mel mode, audio (B, T) in waveform mode."""
        return self.denormalize(x[:, 0].float()) if self.mode == "mel" else x[:, 0].float()

    def encode(self, audio):
        """The posterior q(z | audio): an object with .mean, .logvar and .sample()."""
        return self.vae.encode(self.to_input(audio)).latent_dist

    def decode(self, z):
        return self.from_output(self.vae.decode(z).sample)

    def check_vocoder(self, vocoder):
        """Raise ValueError naming each mel setting in which `vocoder` (a common.vocoder.Vocoder) differs."""
        if self.mode != "mel":
            raise ValueError("a waveform-mode VAE decodes to audio itself; it takes no vocoder")
        vocoder.check_mel_config(self.mel_config, what="the audio VAE")


def save_audio_vae(folder, vae, mode, mel_config, mel_mean, mel_std, latent_stats, extra=None):
    """Write the diffusers folder of `vae`, `audio_vae.json` and `latent_stats.json` to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    config = {"format": FORMAT, "mode": mode, "mel": mel_config.to_dict(),
              "mel_normalization": {"mean": float(mel_mean), "std": float(mel_std)}, **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (folder / "latent_stats.json").write_text(json.dumps(latent_stats, indent=2) + "\n")


def read_audio_vae_config(folder):
    """The `audio_vae.json` of an export, checked; problems raise ValueError naming the file."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such folder (an audio VAE export holds {CONFIG_NAME}, config.json and "
                         f"diffusion_pytorch_model.safetensors)")
    if not path.is_file():
        raise ValueError(f"{path}: missing (not an audio VAE export of train_audio_vae.py?)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format') if isinstance(config, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if config.get("mode") not in MODES:
        raise ValueError(f"{path}: mode {config.get('mode')!r}, expected one of {', '.join(MODES)}")
    try:
        config["mel"] = MelConfig.from_dict(config["mel"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: mel: {err}") from None
    norm = config.get("mel_normalization") or {}
    if not (isinstance(norm.get("mean"), (int, float)) and isinstance(norm.get("std"), (int, float))
            and norm["std"] > 0):
        raise ValueError(f"{path}: mel_normalization must hold a mean and a positive std (got {norm!r})")
    return config


def load_audio_vae(folder, device="cpu"):
    """The `AudioVAE` exported to `folder`, in eval mode on `device`."""
    config = read_audio_vae_config(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            vae = vae_class(config["mode"]).from_pretrained(folder)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ValueError(f"{folder}: the diffusers model does not load ({' '.join(str(err).split())[:160]})") from None
    norm = config["mel_normalization"]
    out = AudioVAE(vae, config["mode"], config["mel"], norm["mean"], norm["std"], config)
    return out.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Nearest-neighbour upsampling whose backward stays a windowed sum under torch.compile (train_audio_vae.py --compile)
#
# PyTorch decomposes `F.interpolate(mode="nearest")` into a gather before autograd sees it, so under torch.compile
# its backward is a scatter-add into zeros: an atomic add per output element in float32, then a cast. In the mel
# VAE's compiled step the decoder's two upsamplings took 1.25 of 32 ms of kernels that way (H100, README).
# `nearest_upsample` is an autograd Function over the same ATen operators: in eager it runs the kernels
# `F.interpolate` runs; compiled, its forward is the same gather and its backward `upsample_nearest2d_backward`,
# which Inductor lowers to a sum over each input pixel's window, without atomics and the same every run.


class _NearestUpsample2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, scales):
        ctx.in_size, ctx.size, ctx.scales = tuple(x.shape), size, scales
        return torch.ops.aten.upsample_nearest2d(x, size, *scales)

    @staticmethod
    def backward(ctx, grad):
        dx = torch.ops.aten.upsample_nearest2d_backward(grad, ctx.size, ctx.in_size, *ctx.scales)
        return dx, None, None


def nearest_upsample(x, output_size=None):
    """`F.interpolate(x, scale_factor=2.0, mode="nearest")`, or with `size=output_size` when given, of a 4D tensor:
    the same values and gradients, in the same memory format."""
    if output_size is None:
        size, scales = [2 * x.shape[2], 2 * x.shape[3]], (2.0, 2.0)
    else:
        size, scales = [int(s) for s in output_size], (None, None)
    return _NearestUpsample2d.apply(x, size, scales)


class NearestUpsampleConv(nn.Module):
    """diffusers' `Upsample2D` with its defaults (nearest interpolation, then its convolution, no norm) over
    `nearest_upsample`. It holds the same convolution, so parameters and state-dict keys are unchanged."""

    def __init__(self, upsample):
        super().__init__()
        self.conv = upsample.conv

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        if not torch.compiler.is_compiling():
            # diffusers' guards for the eager NHWC kernel (fails on large batches or outputs of 2^31 elements);
            # compiled, the upsampling is a gather and needs neither.
            scale = 2 if output_size is None else max(f / s for f, s in zip(output_size, hidden_states.shape[-2:]))
            if hidden_states.shape[0] >= 64 or hidden_states.numel() * scale > 2 ** 31:
                hidden_states = hidden_states.contiguous()
        return self.conv(nearest_upsample(hidden_states, output_size))


def _replaceable(module):
    from diffusers.models.upsampling import Upsample2D

    return (type(module) is Upsample2D and module.norm is None and not module.use_conv_transpose
            and module.interpolate and module.use_conv and module.name == "conv")


def compile_friendly_upsampling(model):
    """Replace every default diffusers `Upsample2D` in `model` by `NearestUpsampleConv`, in place; returns how many.
    Layers with a norm, a transposed convolution, no convolution or another interpolation are left as they are."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _replaceable(child):
                setattr(parent, name, NearestUpsampleConv(child))
                count += 1
    return count
