"""Frozen text encoders for conditioning: captions -> per-token hidden states (B, L, D) and a mask (B, L).

`build_text_encoder(SPEC)` takes one of these specs (the scripts' `--text_encoder SPEC`):

    open_clip:MODEL:PRETRAINED     an OpenCLIP model and its weights, as `open_clip.create_model(MODEL, pretrained=
                                   PRETRAINED)`: a tag (open_clip:ViT-L-14:laion2b_s32b_b82k, the default) or a
                                   checkpoint file (open_clip:ViT-L-14:/ckpt/epoch_32.pt)
    open_clip:hf-hub:ORG/REPO      OpenCLIP's own Hub layout (config and weights from the repository)
    open_clip:local-dir:DIR        the same layout on disk: DIR/open_clip_config.json and the weights beside it
    open_clip:CONFIG.json:WEIGHTS  a model config file of one's own (open_clip's JSON: embed_dim, vision_cfg,
                                   text_cfg) and a checkpoint file
    hf-clip:NAME_OR_PATH           a Hugging Face CLIP text model (CLIPTokenizer + CLIPTextModel), 77 tokens
    hf:NAME_OR_PATH                any Hugging Face text encoder (AutoTokenizer + AutoModel; T5 and other
                                   encoder-decoders keep their encoder only), e.g.
                                   hf:sentence-transformers/all-MiniLM-L6-v2

Every encoder is frozen (no gradients, always in eval mode) and returns the states of every position, padded to a
fixed `max_length` (77 for CLIP; captions are truncated to it, never refused), with a mask that is True on real
tokens, begin and end tokens included. Only the text tower is kept (OpenCLIP's image tower is freed on loading).

layer="last" gives the final states before any pooling or projection: for CLIP, after the final LayerNorm.
layer="penultimate" gives the output of the second-to-last block; for CLIP models (both open_clip and hf-clip) the
final LayerNorm is applied to it too, as Stable Diffusion 2 does with OpenCLIP ViT-H (SDXL's Hugging Face route
skips that norm); for other hf models it is the raw `hidden_states[-2]` (their norms differ too much for one rule).

`key` names the encoder and its weights for cache keys: the spec for weights fetched by name, the resolved path and
a short content fingerprint (`fingerprint`) for local files; ";layer=penultimate" and ";max_length=N" are appended
when those differ from the defaults, since they change the states too.
"""

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

LAYERS = ("last", "penultimate")
DEFAULT_TEXT_ENCODER = "open_clip:ViT-L-14:laion2b_s32b_b82k"
SPEC_FORMS = ("open_clip:MODEL:PRETRAINED, open_clip:hf-hub:ORG/REPO, open_clip:local-dir:DIR, "
              "open_clip:CONFIG.json:WEIGHTS, hf-clip:NAME_OR_PATH, hf:NAME_OR_PATH")
CLIP_MAX_LENGTH = 77


def _spec_error(spec, problem):
    return ValueError(f"text encoder '{spec}': {problem} (valid forms: {SPEC_FORMS})")


def _looks_like_path(name):
    """A Hub id is NAME or ORG/NAME; anything rooted, relative-marked or deeper is meant as a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") >= 2


def fingerprint(path, samples=64, chunk=1 << 16, whole_below=8 << 20):
    """Short hex hash of the file, or of every file under the folder (hidden folders skipped): relative names,
    sizes and contents. Files under 8 MiB are read whole; larger ones by `samples` evenly spaced chunks, head and
    tail included, so a multi-GB checkpoint costs a few MiB of reading. Every stretch longer than 1/63 of a file is
    sampled (a whole layer of any large model), so new weights change the fingerprint in practice, while copying
    or touching the files does not."""
    path = Path(path).expanduser()
    if path.is_file():
        files, root = [path], path.parent
    else:
        files, root = [], path
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= whole_below:
                digest.update(fh.read())
                continue
            for i in range(samples):
                fh.seek((size - chunk) * i // (samples - 1))
                digest.update(fh.read(chunk))
    return digest.hexdigest()[:12]


class TextEncoder(nn.Module):
    """Frozen. Captions -> (hidden (B, L, D) float, mask (B, L) bool), L = max_length.

    Subclasses set `key`, `max_length`, `hidden_size`, `layer`, `tokenizer` (a picklable callable captions ->
    dict of (B, L) tensors, cheap to hand to DataLoader workers without the model) and implement `forward`."""

    key: str
    max_length: int
    hidden_size: int

    def _freeze(self):
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # frozen for good: a parent module's .train() must not switch dropout back on
        return super().train(False)

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def tokenize(self, captions):
        """Captions (a list or one string) -> {"input_ids": (B, L) long, "attention_mask": (B, L) long} on the CPU:
        what `forward` takes (moved to the model's device by the caller or by `forward` itself)."""
        return self.tokenizer(captions)

    def encode(self, captions, device=None):
        """Tokenize and run in one go, without gradients; `device` is the model's, when the caller knows it."""
        tokens = {k: v.to(device or self.device) for k, v in self.tokenize(captions).items()}
        with torch.no_grad():
            return self(tokens)

    def extra_repr(self):
        return f"key={self.key!r}, max_length={self.max_length}, hidden_size={self.hidden_size}, layer={self.layer!r}"


def _key_suffix(layer, max_length, default_length):
    suffix = "" if layer == "last" else f";layer={layer}"
    return suffix + ("" if max_length == default_length else f";max_length={max_length}")


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP


class OpenClipTokenizer:
    """open_clip's tokenizer at a fixed length. Its result keeps the end token when truncating; the mask covers
    every position up to the last non-padding one (CLIP pads with id 0, which is also the BPE token "!", so a
    plain `ids != 0` would drop exclamation marks inside a caption)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = int(tokenizer([""], context_length=8)[0, -1])  # "" -> begin, end, then padding

    def __call__(self, captions):
        captions = [captions] if isinstance(captions, str) else list(captions)
        ids = self.tokenizer(captions, context_length=self.max_length).long()  # (B, L)
        real = ids != self.pad_id
        length = self.max_length - real.flip(1).int().argmax(1)  # index of the last real token + 1
        length = torch.where(real.any(1), length, 0)
        mask = torch.arange(self.max_length)[None, :] < length[:, None]
        return {"input_ids": ids, "attention_mask": mask.long()}


def _load_open_clip(spec, rest):
    """-> (model, tokenizer, key) for the open_clip: forms; only the arguments are checked here, open_clip does
    the loading exactly as for a user."""
    import open_clip

    if rest.startswith("local-dir:"):
        folder = Path(rest[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise _spec_error(spec, f"no such file '{folder / 'open_clip_config.json'}'")
        name, pretrained = f"local-dir:{folder}", None
        key = f"open_clip:local-dir:{folder.resolve()}#{fingerprint(folder)}"
    elif rest.startswith("hf-hub:"):
        name, pretrained, key = rest, None, f"open_clip:{rest}"
    else:
        model_name, _, pretrained = rest.partition(":")
        if not model_name or not pretrained:
            raise _spec_error(spec, "give a model and its weights, open_clip:MODEL:PRETRAINED")
        if model_name.endswith(".json"):
            config, weights = Path(model_name).expanduser(), Path(pretrained).expanduser()
            for p in (config, weights):
                if not p.is_file():
                    raise _spec_error(spec, f"no such file '{p}'")
            # registers the config under its file name, the route open_clip offers for configs of one's own
            open_clip.add_model_config(config)
            name, pretrained = config.stem, str(weights)
            key = f"open_clip:{config.resolve()}:{weights.resolve()}#{fingerprint(config)}{fingerprint(weights)}"
        else:
            name = model_name.replace("/", "-")  # open_clip's own spelling of ViT-B/32
            if name not in open_clip.list_models():
                raise _spec_error(spec, f"open_clip has no model '{model_name}'")
            if open_clip.get_pretrained_cfg(name, pretrained):
                key = f"open_clip:{name}:{pretrained}"
            elif Path(pretrained).expanduser().is_file():
                pretrained = str(Path(pretrained).expanduser())
                key = f"open_clip:{name}:{Path(pretrained).resolve()}#{fingerprint(pretrained)}"
            elif _looks_like_path(pretrained) or Path(pretrained).suffix:
                raise _spec_error(spec, f"no such file '{pretrained}'")
            else:
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
                raise _spec_error(spec, f"'{pretrained}' is neither a weights file nor a tag of {name} ({tags})")
    model = open_clip.create_model(name, pretrained=pretrained)
    return model, open_clip.get_tokenizer(name), key


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an OpenCLIP model (CLIP, or CustomTextCLIP with open_clip's own text transformer, e.g.
    SigLIP), giving the per-token states that `encode_text` pools: token + positional embeddings -> transformer
    (with the model's causal mask, if any) -> ln_final."""

    def __init__(self, model, tokenizer, key, max_length=None, layer="last"):
        super().__init__()
        if hasattr(model, "visual"):
            del model.visual  # the image tower is dead weight here (ViT-L/14: 300M parameters)
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text, CLIP flattens it
        if not hasattr(text, "token_embedding"):
            raise ValueError(f"{key}: the text tower is a Hugging Face model; use hf:NAME for it")
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            raise ValueError(f"{key}: text towers with a class token or padding mask (CoCa) are not supported")
        self.model, self.layer = model, layer
        self.context_length = text.positional_embedding.shape[0]
        self.max_length = max_length or self.context_length
        if not 1 < self.max_length <= self.context_length:
            raise ValueError(f"{key}: max_length must be in [2, {self.context_length}] (got {self.max_length})")
        if layer == "penultimate" and len(text.transformer.resblocks) < 2:
            raise ValueError(f"{key}: penultimate layer of a one-block text transformer")
        self.hidden_size = text.ln_final.weight.shape[0]
        self.tokenizer = OpenClipTokenizer(tokenizer, self.max_length)
        self.key = key + _key_suffix(layer, self.max_length, self.context_length)
        self._freeze()

    @property
    def text(self):
        # a property, not a second registration of the same modules (CLIP's tower is the model itself)
        return getattr(self.model, "text", self.model)

    def forward(self, tokens):
        t = self.text
        ids = tokens["input_ids"].to(t.positional_embedding.device)  # (B, L)
        mask = tokens["attention_mask"].to(ids.device).bool()
        length = ids.size(1)
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(ids).to(cast) + t.positional_embedding[:length].to(cast)  # (B, L, W)
        attn_mask = None if t.attn_mask is None else t.attn_mask[:length, :length]  # additive, causal
        if self.layer == "last":
            x = t.transformer(x, attn_mask=attn_mask)
        else:
            penultimate = len(t.transformer.resblocks) - 2
            _, states = t.transformer.forward_intermediates(x, attn_mask=attn_mask, indices=[penultimate],
                                                            stop_early=True)
            x = states[-1]
        return t.ln_final(x), mask  # (B, L, W), (B, L)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


class HFTokenizer:
    """A Hugging Face tokenizer at a fixed length (padded and truncated to max_length)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions):
        captions = [captions] if isinstance(captions, str) else list(captions)
        out = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}


def _resolve_hf(spec, name):
    """-> (what from_pretrained gets, key prefix's identity part)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _spec_error(spec, f"no config.json in '{path}'")
        return str(path), f"{path.resolve()}#{fingerprint(path)}"
    if _looks_like_path(name):
        raise _spec_error(spec, f"no such folder '{name}'")
    return name, name


class HuggingFaceTextEncoder(TextEncoder):
    """A transformers encoder's per-token states (last_hidden_state, or hidden_states[-2] for "penultimate"); the
    mask is the tokenizer's attention mask, which the model also gets."""

    def __init__(self, model, tokenizer, key, max_length, layer="last", final_norm=None):
        super().__init__()
        self.model, self.layer = model, layer
        self.final_norm_name = final_norm  # a submodule's name in `model`, applied after the penultimate layer
        config = model.config
        self.hidden_size = getattr(config, "hidden_size", None) or config.d_model
        limit = getattr(config, "max_position_embeddings", None)  # T5's relative positions have no limit
        if max_length < 2 or (limit is not None and max_length > limit):
            raise ValueError(f"{key}: max_length must be in [2, {limit}] (got {max_length})")
        if tokenizer.pad_token is None:  # decoder-style vocabularies: any id will do, the mask hides it
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.max_length = max_length
        self.tokenizer = HFTokenizer(tokenizer, max_length)
        self.key = key
        self._freeze()

    def forward(self, tokens):
        ids = tokens["input_ids"].to(self.device)  # (B, L)
        attention_mask = tokens["attention_mask"].to(ids.device)
        penultimate = self.layer == "penultimate"
        out = self.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=penultimate)
        if not penultimate:
            return out.last_hidden_state, attention_mask.bool()
        x = out.hidden_states[-2]  # hidden_states[0] is the embedding output, [-1] the last block's
        if self.final_norm_name:
            x = self.model.get_submodule(self.final_norm_name)(x)
        return x, attention_mask.bool()


def _load_hf(spec, name, clip, max_length, layer):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    source, identity = _resolve_hf(spec, name)
    config = AutoConfig.from_pretrained(source)
    model_type = getattr(config, "model_type", "")
    is_clip = clip or model_type in ("clip", "clip_text_model")
    if is_clip:
        tokenizer = (CLIPTokenizer if clip else AutoTokenizer).from_pretrained(source)
        model = CLIPTextModel.from_pretrained(source)  # from a full CLIP checkpoint too: the text half only
        # transformers 4 nests the tower in .text_model, 5 flattens it
        final_norm = "text_model.final_layer_norm" if hasattr(model, "text_model") else "final_layer_norm"
        default_length = CLIP_MAX_LENGTH
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if model_type in ("t5", "mt5", "umt5"):
            import transformers

            cls = getattr(transformers, {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[model_type] + "EncoderModel")
            model = cls.from_pretrained(source)  # the encoder's weights only
        else:
            model = AutoModel.from_pretrained(source)
            if getattr(model.config, "is_encoder_decoder", False):
                model = model.get_encoder()  # e.g. BART: captions only need the encoder
        final_norm = None
        default_length = min(tokenizer.model_max_length, CLIP_MAX_LENGTH)
    max_length = max_length or default_length
    key = f"{'hf-clip' if clip else 'hf'}:{identity}" + _key_suffix(layer, max_length, default_length)
    # float32 whatever the files hold: transformers 5 keeps a half-precision checkpoint in half precision.
    return HuggingFaceTextEncoder(model.float(), tokenizer, key, max_length, layer, final_norm)


# ---------------------------------------------------------------------------------------------------------------


def build_text_encoder(spec, max_length=None, layer="last"):
    """A frozen TextEncoder (on the CPU, float32) from a spec (see the module docstring). ValueError, one line
    naming the spec and the valid forms, for an unknown form, a missing local file or an unknown open_clip name."""
    if layer not in LAYERS:
        raise ValueError(f"unknown text encoder layer '{layer}' (choose from {', '.join(LAYERS)})")
    prefix, _, rest = spec.partition(":")
    if not rest:
        raise _spec_error(spec, "unknown form")
    if prefix == "open_clip":
        model, tokenizer, key = _load_open_clip(spec, rest)
        return OpenClipTextEncoder(model, tokenizer, key, max_length=max_length, layer=layer)
    if prefix in ("hf", "hf-clip"):
        return _load_hf(spec, rest, clip=prefix == "hf-clip", max_length=max_length, layer=layer)
    raise _spec_error(spec, f"unknown form '{prefix}:'")
