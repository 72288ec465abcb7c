"""Text encoders through the same loading code users run (open_clip.create_model, from_pretrained), on tiny random
models that the tests build and save: nothing is downloaded."""

import json
import pickle
import shutil

import pytest
import torch

from common.text_encoders import build_text_encoder, fingerprint

CAPTIONS = ["a red cat on the mat", "wow!~ a dog!$", "", " ".join(["photo of a blue dog"] * 60)]

OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def _save_open_clip(folder, seed):
    """A tiny random CLIP in open_clip's local-dir layout (config + safetensors), plus a config file of its own."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = CLIP(**OPEN_CLIP_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    (folder / "tiny-clip-test.json").write_text(json.dumps(OPEN_CLIP_CFG))
    return folder


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return _save_open_clip(tmp_path_factory.mktemp("open_clip") / "a", seed=0)


@pytest.fixture(scope="module")
def open_clip_encoder(open_clip_dir):
    return build_text_encoder(f"open_clip:local-dir:{open_clip_dir}")


WORDS = "a photo of cat dog red blue the on mat wow !".split()


def _bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)})


def _save_bert(folder, seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = _bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _save_bert(tmp_path_factory.mktemp("bert"), seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters] + ["ca", "cat</w>"]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(vocab)}, merges=[("c", "a"), ("ca", "t</w>")])
    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    folder = tmp_path_factory.mktemp("hf_clip")
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# open_clip


def test_open_clip_shapes_mask_and_truncation(open_clip_encoder):
    enc = open_clip_encoder
    assert (enc.max_length, enc.hidden_size) == (77, 32)
    tokens = enc.tokenize(CAPTIONS)
    hidden, mask = enc(tokens)
    assert hidden.shape == (4, 77, 32) and hidden.dtype == torch.float32
    assert mask.shape == (4, 77) and mask.dtype == torch.bool
    bpe = enc.tokenizer.tokenizer
    # begin + caption + end; "!" inside "!~" is BPE id 0, open_clip's padding id too: still a real token
    assert 0 in bpe.encode(CAPTIONS[1])
    expected = [min(len(bpe.encode(c)) + 2, 77) for c in CAPTIONS]
    assert mask.sum(1).tolist() == expected
    ids = tokens["input_ids"]
    for row, n in zip(ids, expected):
        assert row[n - 1] == bpe.eot_token_id  # the end token is the last real one, kept when truncating
        assert (row[n:] == 0).all()
    assert mask[:, 0].all() and not mask[2, 2:].any()  # "" is begin + end only


def test_open_clip_per_token_states_pool_to_encode_text(open_clip_encoder):
    """The states at the end token, projected, are open_clip's own pooled text embedding."""
    enc = open_clip_encoder
    tokens = enc.tokenize(CAPTIONS)
    with torch.no_grad():
        hidden, _ = enc(tokens)
        ids = tokens["input_ids"]
        pooled = hidden[torch.arange(len(ids)), ids.argmax(-1)] @ enc.model.text_projection
        reference = enc.model.encode_text(ids)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)


def test_open_clip_penultimate_is_second_to_last_block_with_ln_final(open_clip_dir, open_clip_encoder):
    enc = build_text_encoder(f"open_clip:local-dir:{open_clip_dir}", layer="penultimate")
    tokens = enc.tokenize(CAPTIONS[:2])
    m = enc.model
    with torch.no_grad():
        hidden, _ = enc(tokens)
        x = m.token_embedding(tokens["input_ids"]) + m.positional_embedding
        for block in m.transformer.resblocks[:-1]:
            x = block(x, attn_mask=m.attn_mask)
        reference = m.ln_final(x)
        last, _ = open_clip_encoder(tokens)
    torch.testing.assert_close(hidden, reference)
    assert not torch.allclose(hidden, last)
    assert enc.key == open_clip_encoder.key + ";layer=penultimate"


def test_open_clip_config_file_route_loads_the_same_weights(open_clip_dir, open_clip_encoder):
    enc = build_text_encoder(
        f"open_clip:{open_clip_dir / 'tiny-clip-test.json'}:{open_clip_dir / 'open_clip_model.safetensors'}")
    torch.manual_seed(123)  # a fresh random init would differ: equality proves the weights were loaded
    a, mask_a = enc.encode(CAPTIONS)
    b, mask_b = open_clip_encoder.encode(CAPTIONS)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)


def test_open_clip_frozen_text_only_and_bfloat16(open_clip_dir):
    enc = build_text_encoder(f"open_clip:local-dir:{open_clip_dir}")
    assert not hasattr(enc.model, "visual")
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    full, _ = enc.encode(CAPTIONS[:2])
    enc.to(dtype=torch.bfloat16)
    half, mask = enc.encode(CAPTIONS[:2])
    assert half.dtype == torch.bfloat16 and mask.dtype == torch.bool
    assert (half.float() - full).abs().max() < 0.1


def test_open_clip_shorter_max_length(open_clip_dir, open_clip_encoder):
    enc = build_text_encoder(f"open_clip:local-dir:{open_clip_dir}", max_length=16)
    hidden, mask = enc.encode(CAPTIONS)
    assert hidden.shape == (4, 16, 32) and mask[3].all()
    assert enc.tokenize(CAPTIONS)["input_ids"][3, -1] == enc.tokenizer.tokenizer.eot_token_id
    assert enc.key.endswith(";max_length=16") and enc.key != open_clip_encoder.key
    with pytest.raises(ValueError, match="max_length"):
        build_text_encoder(f"open_clip:local-dir:{open_clip_dir}", max_length=78)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


def test_hf_bert_round_trip(bert_dir):
    from transformers import BertModel

    enc = build_text_encoder(f"hf:{bert_dir}")
    assert (enc.max_length, enc.hidden_size) == (77, 32)  # min(model_max_length, 77)
    tokens = enc.tokenize(CAPTIONS)
    hidden, mask = enc(tokens)
    assert hidden.shape == (4, 77, 32) and mask.shape == (4, 77)
    tokenizer = _bert_tokenizer()
    expected = [min(len(tokenizer(c)["input_ids"]), 77) for c in CAPTIONS]  # [CLS] ... [SEP]
    assert mask.sum(1).tolist() == expected and expected[2] == 2 and expected[3] == 77
    assert (tokens["input_ids"][~mask] == tokenizer.pad_token_id).all()
    reference = BertModel.from_pretrained(bert_dir).eval()(**tokens).last_hidden_state
    torch.testing.assert_close(hidden, reference)


def test_hf_half_precision_checkpoint_loads_in_float32(tmp_path):
    from transformers import BertModel

    folder = _save_bert(tmp_path / "bert", seed=1)
    BertModel.from_pretrained(folder).half().save_pretrained(folder)  # as some hub checkpoints ship
    enc = build_text_encoder(f"hf:{folder}")
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    assert enc.encode(CAPTIONS[:2])[0].dtype == torch.float32


def test_hf_clip_round_trip_and_penultimate(clip_dir):
    from transformers import CLIPTextModel

    enc = build_text_encoder(f"hf-clip:{clip_dir}")
    pen = build_text_encoder(f"hf-clip:{clip_dir}", layer="penultimate")
    assert (enc.max_length, enc.hidden_size) == (77, 32)
    tokens = enc.tokenize(["a cat", "dog", "", "cat " * 100])
    hidden, mask = enc(tokens)
    assert hidden.shape == (4, 77, 32)
    assert mask.sum(1).tolist() == [4, 5, 2, 77]  # begin + tokens + end ("cat" is one merged token)
    model = CLIPTextModel.from_pretrained(clip_dir).eval()
    out = model(**tokens, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.last_hidden_state)
    penultimate, _ = pen(tokens)
    torch.testing.assert_close(penultimate, model.final_layer_norm(out.hidden_states[-2]))
    assert pen.key.endswith(";layer=penultimate")


def test_hf_t5_uses_the_encoder_only(tmp_path):
    from transformers import T5Config, T5EncoderModel, T5Model

    torch.manual_seed(0)
    tokenizer = _bert_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      decoder_start_token_id=0)
    T5Model(config).save_pretrained(tmp_path)  # a full encoder-decoder checkpoint, as T5 ships
    tokenizer.save_pretrained(tmp_path)
    enc = build_text_encoder(f"hf:{tmp_path}", max_length=12)
    assert isinstance(enc.model, T5EncoderModel) and enc.hidden_size == 32
    hidden, mask = enc.encode(CAPTIONS)
    assert hidden.shape == (4, 12, 32)
    assert mask.sum(1).tolist() == [min(len(tokenizer(c)["input_ids"]), 12) for c in CAPTIONS]


# ---------------------------------------------------------------------------------------------------------------
# Shared behaviour


def test_deterministic_and_tokenizer_picklable(bert_dir, open_clip_encoder):
    bert = build_text_encoder(f"hf:{bert_dir}")
    for enc in (bert, open_clip_encoder):
        a, mask_a = enc.encode(CAPTIONS)
        b, mask_b = enc.encode(CAPTIONS)
        assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
        # DataLoader workers get the tokenizer alone, by pickle
        tokenizer = pickle.loads(pickle.dumps(enc.tokenizer))
        for name, value in tokenizer(CAPTIONS).items():
            assert torch.equal(value, enc.tokenize(CAPTIONS)[name])
    assert torch.equal(build_text_encoder(f"hf:{bert_dir}").encode(CAPTIONS)[0], bert.encode(CAPTIONS)[0])


def test_key_follows_weights_not_file_times(tmp_path):
    folder = _save_bert(tmp_path / "bert", seed=0)
    key = build_text_encoder(f"hf:{folder}").key
    assert key.startswith(f"hf:{folder.resolve()}#")
    _save_bert(folder, seed=0)  # the same weights written again: new mtimes, same key
    assert build_text_encoder(f"hf:{folder}").key == key
    _save_bert(folder, seed=1)  # other weights at the same path
    assert build_text_encoder(f"hf:{folder}").key != key

    oc = _save_open_clip(tmp_path / "oc", seed=0)
    spec = f"open_clip:{oc / 'tiny-clip-test.json'}:{oc / 'open_clip_model.safetensors'}"
    key = build_text_encoder(spec).key
    shutil.copytree(oc, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == fingerprint(oc)  # content, not times or location
    _save_open_clip(oc, seed=1)
    assert build_text_encoder(spec).key != key


@pytest.mark.parametrize("spec", [
    "nope:something", "ViT-L-14", "open_clip:ViT-L-14", "open_clip:NoSuchModel:openai",
    "open_clip:ViT-B-32:no_such_tag", "open_clip:ViT-B-32:/no/such/weights.pt", "open_clip:local-dir:/no/such/dir",
    "open_clip:/no/such/config.json:/no/such/weights.pt", "hf:/no/such/folder", "hf-clip:./no/such/folder",
])
def test_bad_specs_raise_one_line_value_error(spec):
    with pytest.raises(ValueError) as info:
        build_text_encoder(spec)
    message = str(info.value)
    assert "\n" not in message and spec in message and "hf:NAME_OR_PATH" in message


def test_bad_layer_raises(bert_dir):
    with pytest.raises(ValueError, match="layer"):
        build_text_encoder(f"hf:{bert_dir}", layer="middle")
