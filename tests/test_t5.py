"""minialg.models.t5 against transformers' T5EncoderModel / UMT5EncoderModel / T5Tokenizer and diffusers' Wan
prompt_clean, on tiny random checkpoints saved in the real on-disk layout."""

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
import transformers
from safetensors.torch import load_file

from minialg.models.t5 import T5Config, T5Encoder, Tokenizer, clean_prompt, relative_position_buckets
from minialg.checkpoint import config_from

REAL_CONFIGS = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"
REFERENCES = {"umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel),
              "t5": (transformers.T5Config, transformers.T5EncoderModel)}
EXTRA_IDS = 10


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def save_tiny_reference(model_type: str, folder: Path) -> torch.nn.Module:
    """A tiny random reference encoder, saved with save_pretrained like a checkpoint's text_encoder/."""
    config_class, model_class = REFERENCES[model_type]
    torch.manual_seed(0)
    config = config_class(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=20,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
    ref = model_class(config).eval()
    with torch.no_grad():  # make biases and norm weights matter: a wrong bucket or a dropped scale shows
        for name, p in ref.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            elif "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    ref.save_pretrained(folder)
    return ref


def load_ours(folder: Path) -> T5Encoder:
    cfg = config_from(T5Config, json.loads((folder / "config.json").read_text()))
    tensors = load_file(folder / "model.safetensors")
    state = {T5Encoder.checkpoint_name(n): t for n, t in tensors.items() if T5Encoder.checkpoint_name(n)}
    with torch.device("meta"):
        ours = T5Encoder(cfg)
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_encoder_matches_reference(model_type, tmp_path):
    ref = save_tiny_reference(model_type, tmp_path)
    ours = load_ours(tmp_path)
    assert ours.config.bias_in_every_block == (model_type == "umt5")

    g = torch.Generator().manual_seed(1)
    L = 40
    input_ids = torch.randint(3, 200, (2, L), generator=g)
    attention_mask = torch.ones(2, L, dtype=torch.long)
    attention_mask[1, 23:] = 0  # second prompt: 23 tokens, then padding
    input_ids[1, 23:] = 0
    with torch.no_grad():
        for mask in (attention_mask, None):  # Wan passes the mask, CogVideoX does not
            expected = ref(input_ids, attention_mask=mask).last_hidden_state
            got = ours(input_ids, mask)
            assert got.shape == expected.shape == (2, L, 32)
            err = rel_err(got, expected)
            print(f"{model_type} mask={mask is not None}: rel err {err:.2e}")
            assert err <= 1e-5


@pytest.mark.parametrize("length, num_buckets, max_distance", [(40, 8, 20), (600, 32, 128)])
def test_buckets_match_reference(length, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    position = torch.arange(length)
    expected = T5Attention._relative_position_bucket(position[None, :] - position[:, None], True, num_buckets,
                                                     max_distance)
    buckets = relative_position_buckets(length, num_buckets, max_distance, torch.device("cpu"))
    assert torch.equal(buckets, expected)
    assert len(buckets.unique()) == num_buckets - 1  # all but "after the query, distance 0"


@pytest.mark.parametrize("model_type, folder", [("umt5", "Wan2.1-I2V-14B-480P-Diffusers"),
                                                ("t5", "CogVideoX-5b-I2V")])
def test_state_dict_matches_real_configs(model_type, folder):
    d = json.loads((REAL_CONFIGS / folder / "text_encoder" / "config.json").read_text())
    config_class, model_class = REFERENCES[model_type]
    with torch.device("meta"):
        ref = model_class(config_class.from_dict(d))
        ours = T5Encoder(config_from(T5Config, d))
    assert ours.config.model_type == model_type and ours.config.num_layers == 24
    expected = {T5Encoder.checkpoint_name(n): tuple(t.shape) for n, t in ref.state_dict().items()
                if T5Encoder.checkpoint_name(n) is not None}
    assert {n: tuple(t.shape) for n, t in ours.state_dict().items()} == expected
    assert not list(ours.buffers())
    with_bias = [n for n in expected if n.endswith("relative_attention_bias.weight")]
    assert len(with_bias) == (24 if model_type == "umt5" else 1)


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_bf16_load_matches_reference(model_type, tmp_path):
    """transformers' bf16 load keeps no parameter in fp32 (`_keep_in_fp32_modules` is for fp16 only); ours, cast
    the same way, computes the same bf16 numbers (the same ops in the same precisions)."""
    save_tiny_reference(model_type, tmp_path)
    ref = REFERENCES[model_type][1].from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    kept_fp32 = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    ours = load_ours(tmp_path)
    assert kept_fp32 == {n for n in ours.state_dict() if any(f in n for f in T5Encoder.fp32_params)}
    ours = ours.to(torch.bfloat16)
    input_ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, 17:] = 0
    with torch.no_grad():
        expected = ref(input_ids, attention_mask=attention_mask).last_hidden_state
        got = ours(input_ids, attention_mask)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert rel_err(got.float(), expected.float()) <= 1e-5


def test_config_rejects_what_is_not_implemented():
    with pytest.raises(ValueError):
        T5Config(feed_forward_proj="relu")
    with pytest.raises(ValueError):
        config_from(T5Config, {"model_type": "mt5"})


# ---- tokenizer ------------------------------------------------------------------------------------------------

TRAINING_TEXT = [
    "A cat sits on a red mat while the sun sets over the hills.",
    "Two dogs run across a snowy field, chasing a bright orange ball!",
    "The camera pans slowly to reveal a city skyline at night; neon lights flicker.",
    "Café au lait, naïve façade, jalapeño, Straße, déjà vu.",
    "Numbers like 123, 4.56 and 7,890 appear on the screen in 2024.",
    "A woman in a blue dress dances gracefully under the rain.",
    "Waves crash against the rocky shore as seagulls fly overhead.",
    "An old man reads a newspaper on a bench in the park.",
    "日本の桜が満開です。子供たちが遊んでいる。",
    "A robot assembles a car in a futuristic factory (very detailed).",
    "Fireworks explode in the sky: red, green, blue and gold!",
    "A close-up of a hummingbird drinking nectar from a flower.",
    "Slow motion: water droplets splash off a leaf, 4K, cinematic lighting.",
    "A panda eats bamboo in a misty forest -- soft focus, pastel colours.",
] * 3

PROMPTS = [
    "A cat sits on a red mat.",
    "  leading and trailing spaces   ",
    "repeated    spaces\tand\ttabs",
    "new\nlines\n\nand\r\nreturns",
    "",
    "   ",
    "Punctuation!!! (brackets) [square] {curly} -- dashes; colons: \"quotes\" 'single' ...",
    "Digits 0123456789 and 3.14159, 1,000,000 and 2024-05-06",
    "Unicode: 日本の桜, Ελληνικά, русский, emoji 🎥🐱, symbols ©®™ → ∞",
    "Accents: Café naïve façade jalapeño Straße déjà vu; decomposed: Cafe\u0301",
    "NFKC: ＦＵＬＬ　ｗｉｄｔｈ ﬁne ligature … ellipsis ½ ² Ⅻ",
    "odd spaces:\u00a0nbsp\u2009thin\u3000ideographic\u2028line-sep",
    "<extra_id_0>literal <extra_id_9>x</s>y<pad> <unk> <extra_id_99> special tokens",
    "A robot assembles a car in a futuristic factory (very detailed), " * 12,  # longer than max_length
]


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> Path:
    """A small T5-style unigram sentencepiece model: pad 0, eos 1, unk 2, no bos."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.99, hard_vocab_limit=False,
        minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def wan_like_folder(spiece_model: Path, folder: Path) -> Path:
    """spiece.model + tokenizer.json + tokenizer_config.json, as transformers saves a T5 tokenizer.
    (transformers 5's `T5Tokenizer(vocab_file=...)` ignores the file; from_pretrained converts it.)"""
    raw = folder / "raw"
    raw.mkdir()
    shutil.copy(spiece_model, raw / "spiece.model")
    transformers.T5Tokenizer.from_pretrained(raw, extra_ids=EXTRA_IDS).save_pretrained(folder / "tokenizer")
    shutil.copy(spiece_model, folder / "tokenizer" / "spiece.model")
    return folder / "tokenizer"


def spiece_only_folder(spiece_model: Path, folder: Path) -> Path:
    """spiece.model + a tokenizer_config.json that only says how many sentinels there are."""
    (folder / "tokenizer").mkdir()
    shutil.copy(spiece_model, folder / "tokenizer" / "spiece.model")
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS}
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer"


@pytest.mark.parametrize("layout, reference_class", [(wan_like_folder, "T5TokenizerFast"),
                                                      (spiece_only_folder, "T5Tokenizer")])
@pytest.mark.parametrize("max_length", [16, 64])
def test_tokenizer_matches_transformers(layout, reference_class, max_length, spiece_model, tmp_path):
    folder = layout(spiece_model, tmp_path)
    ref = getattr(transformers, reference_class).from_pretrained(folder)  # what diffusers loads
    ours = Tokenizer(folder / "spiece.model")
    spm_size = ours.sp.get_piece_size()
    assert len(ref) == spm_size + EXTRA_IDS  # the sentencepiece vocabulary and the sentinels
    expected = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                   add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    input_ids, attention_mask = ours(PROMPTS, max_length)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (len(PROMPTS), max_length)
    for i, prompt in enumerate(PROMPTS):
        assert input_ids[i].tolist() == expected.input_ids[i].tolist(), prompt
        assert attention_mask[i].tolist() == expected.attention_mask[i].tolist(), prompt
    assert (input_ids == 2).any()  # some characters are unknown to the tiny vocabulary
    assert (input_ids >= spm_size).any()  # sentinels were matched literally
    assert attention_mask[-1].all() and input_ids[-1, -1] == 1  # truncated, `</s>` kept last


def test_tokenizer_trained_like_t5(spiece_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert 150 <= sp.get_piece_size() <= 200


CLEAN_PROMPTS = [
    "  A  cat\n\non a\tmat  ",
    "Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39;",
    "mojibake: cafÃ© naÃ¯ve â€œquotesâ€\x9d",
    "ﬁne ligature, full-width ＡＢＣ, curly \u201cquotes\u201d",
    "\u00a0nbsp\u3000ideographic\r\nwindows newline",
    "",
]


def test_clean_prompt_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    for text in CLEAN_PROMPTS:
        assert clean_prompt(text) == prompt_clean(text), repr(text)
    assert clean_prompt("  a &amp;amp; b \n c ") == "a & b c"
