"""Parts shared by the training scripts: small modules of functions and nn.Modules, each unit-tested.

audio_vae      the audio VAE export (mel or waveform): presets, save, load, encode and decode from audio
audio          audio files in any format and rate, read as mono at the rate a model needs; training segments
args           YAML --config feeding argparse defaults; shared flag groups; one-line errors
checkpoint     atomic checkpoints with a manifest, retention, resume; the steps of saving and resuming a run
compare        `python -m common.compare RUN...`: final and best values of runs, one figure
data           resumable sampling, image datasets, corrupt-sample skipping
demo_data      the built-in demo data (and a small random VAE and text encoder for the diffusion tests and demo)
denoisers      DiT (adaLN-Zero, masked text cross-attention) and UNet denoisers behind one forward, as presets
diffusion      noise schedules, objectives and targets, Min-SNR, offset noise, input perturbation, CFG, samplers
discriminators PatchGAN and multi-scale PatchGAN; waveform MPD, MSD, MRD and multi-band STFT (hifigan, bigvgan, dac)
ema            EMA with warm-up
group_norm     GroupNorm + SiLU as fused Triton kernels for the VAEs (--fused_group_norm)
image_metrics  FID, Inception Score, CLIP score, cached reference statistics
losses         GAN losses, feature matching, KL with free bits, R1, LPIPS
media          image grids, audio clips and tracker logging
metrics        PSNR, SSIM; SI-SDR, mel cepstral distortion, PESQ
optim          optimizers and LR schedules by name (AdamW, 8-bit AdamW, Adam, Lion, Muon, SGD, RMSprop)
perf           throughput, model-FLOPs utilisation, peak memory
spectral       the mel configuration (a contract between audio models), log-mel on the GPU, spectral losses
text_encoders  frozen text encoders (open_clip, Hugging Face CLIP, any Hugging Face model): per-token states + mask
training       the Accelerator setup, precision flags, RNG state, guarded optimizer steps, metric logging
vocoder        HiFi-GAN, BigVGAN and Vocos generators; the vocoder export, its loader and command line
"""

import logging

# On a CPU with AVX512-BF16, importing bitsandbytes 0.50 (which diffusers does with every model class) tries to fetch
# its CPU 4-bit matmul from the Hugging Face Hub through the `kernels` package (which transformers 5 installs). Offline,
# `kernels` warns that it skips the publisher check, and bitsandbytes warns when the fetch fails or `kernels` is
# missing. These scripts use bitsandbytes only for 8-bit Adam on the GPU; unsilenced, those lines would open every
# run's log and every one-line error. A script that imports diffusers imports common first.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)
del _name
