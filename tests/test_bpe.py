"""minialg's byte-level BPE tokenizers against transformers' (Hugging Face `tokenizers` underneath), on small
tokenizers trained here and saved in the published layouts of HunyuanVideo-I2V's `tokenizer/` (LLaVA-LLaMA-3:
tokenizer.json + tokenizer_config.json) and `tokenizer_2/` (CLIP-L: vocab.json + merges.txt + tokenizer_config.json).

The LLaMA-3 oracle is loaded as PreTrainedTokenizerFast, never through the class name LlamaTokenizer(Fast): that
reads a LLaMA-3 tokenizer.json as a Llama-2 one (see ALG.md).
"""

import json
import random
import unicodedata

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minialg.models.bpe import (CLIP_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, BPETokenizer, clip_match, gpt2_match,
                                llama3_match, split)

# HunyuanVideo-I2V's prompt template (diffusers' DEFAULT_PROMPT_TEMPLATE) and its crop_start
TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: 1. The main content and theme of the video.2. The color, shape, size, "
    "texture, quantity, text, and spatial relationships of the objects.3. Actions, events, behaviors temporal "
    "relationships, physical movement changes of the objects.4. background environment, light, style and "
    "atmosphere.5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
CROP_START = 103

# the Split regex as LLaVA-LLaMA-3's (and Meta-Llama-3's) tokenizer.json writes it
PUBLISHED_LLAMA3_SPLIT = json.loads('"' + r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
                                    r" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" + '"')

TRAINING_TEXT = [
    "A cat walks on the grass, realistic style. The camera slowly pans to the left as the sun sets.",
    "A woman in a red dress dances in the rain; her hair moves with the wind. It's a beautiful scene.",
    "The video shows a city at night with cars, lights and people walking. They're happy, we've seen it.",
    "Café crème brûlée à la française, naïve façade, Straße, Ærøskøbing, İstanbul, Ελληνικά γράμματα.",
    "中文提示词：一只猫在草地上行走。日本語のテキストとカタカナ。한국어 문장입니다.",
    "Numbers 1 12 123 1234 12345 3.14159 2024-05-09 100% $100 €50 and ٣٤٥ ４５６.",
    "def forward(self, x):\n    return x ** 2  # comment\n\tprint('hello')\n",
    "Emoji 😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ and hashtags #sunset ## ### @user ~~~ ___ ... ??? !!!",
    "I'm sure you'll like it, he'd say. DON'T STOP. IT'S TIME. We'Ve Got It.",
    "camera angles, movements, and transitions used in the video: background environment, light, style",
    "the main content and theme of the video, the color, shape, size, texture, quantity, text, and spatial",
]

TEXTS = [
    "",
    " ",
    "A cat walks on the grass, realistic style.",
    "Café crème brûlée à la française — naïve façade, Ærøskøbing, Straße, İstanbul, ΟΔΥΣΣΕΥΣ ǅemal ʰ",
    "decomposed accents: cafe\u0301 n\u0303o A\u030a",
    "emoji 😀👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ family🙂x",
    "中文提示词：一只猫在草地上行走。日本語のテキスト、カタカナ。한국어 문장 ภาษาไทย العربية",
    "numbers 1 12 123 1234 12345 1234567 3.14159 2024-05-09 ١٢٣٤ ４５６ ² ½ Ⅻ a1b22c333d4444",
    "it's don't they're we've I'm you'll he'd IT'S DON'T THEY'RE We'Ve I'M YOU'LL HE'D 'sam ' 'S 'ſ x's",
    "pneumonoultramicroscopicsilicovolcanoconiosis Donaudampfschifffahrtsgesellschaftskapitänsmütze zebra",
    "spaces   and\ttabs\t\tand\n\nnewlines\r\n\r\n  \n  trailing   \x0b\x0c\x1c\x85\xa0\u2028\u3000end  ",
    "special <|eot_id|> inside<|start_header_id|>user<|end_header_id|>\n\n<image>and <pad><unk> <|begin_of_text|>",
    "broken specials <|eot_id| <image <|EOT_ID|> <<image>>",
    "code: def f(x):\n    return x**2  # comment\n\tprint(\"hi\")!!! ... ??? ((()))\n\n\n",
    "hashtags #sunset ## ### and symbols @user $100 €50 ~~~ ___ <b>bold</b>",
    "CLIP specials <|startoftext|> <|endoftext|> <|STARTOFTEXT|> <|EndOfText|>x<|endoftext|>",
    "x" * 300,
    "word " * 120,
    "ΟΔΟΣ Σ ΣΑ İI",
]


def train(tokenizer: Tokenizer, vocab_size: int, **trainer_options) -> None:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, **trainer_options)
    tokenizer.train_from_iterator(TRAINING_TEXT * 3, trainer)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *[f"<|reserved_special_token_{i}|>" for i in range(4)],
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)], "<unk>", "<image>", "<pad>"]


def write_llama3(folder, string_merges=False):
    """A LLaMA-3-style tokenizer.json (Split regex + ByteLevel, ignore_merges, BOS template) and LLaVA-LLaMA-3's
    tokenizer_config.json (as published with HunyuanVideo-I2V's text encoder: <pad>, <image>, right padding)."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PUBLISHED_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    train(tokenizer, 1000)
    spec = json.loads(tokenizer.to_str())
    spec["model"]["vocab"]["Ġzebra"] = len(spec["model"]["vocab"])  # in the vocabulary, but no merges lead to it
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if string_merges:  # the older way of writing merges: "a b"
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None,
        "added_tokens_decoder": {str(tokenizer.token_to_id(t)): {"content": t, **flags} for t in LLAMA3_SPECIALS},
        "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|end_of_text|>",
        "legacy": True, "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 10**30,
        "pad_token": "<pad>", "padding_side": "right", "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_clip(folder):
    """CLIP-L's tokenizer files: vocab.json (bytes, bytes + </w>, merges, then the two specials), merges.txt with
    its #version line, and openai/clip-vit-large-patch14's tokenizer_config.json."""
    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    train(tokenizer, 900, end_of_word_suffix="</w>")
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab["<|startoftext|>"]): {"content": "<|startoftext|>", "normalized": True, **flags},
            str(vocab["<|endoftext|>"]): {"content": "<|endoftext|>", "normalized": False, **flags}},
        "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    assert any(line.startswith("#") for line in (folder / "merges.txt").read_text().splitlines()[1:])
    return folder


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    folder = write_llama3(tmp_path_factory.mktemp("hunyuan") / "tokenizer")
    return BPETokenizer(folder), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = write_clip(tmp_path_factory.mktemp("hunyuan") / "tokenizer_2")
    return BPETokenizer(folder), CLIPTokenizer.from_pretrained(folder)


def test_the_llama3_scanner_is_for_the_published_regex():
    assert PUBLISHED_LLAMA3_SPLIT == LLAMA3_PATTERN


# --- the regex scanners alone ---------------------------------------------------------------------------------

POOL = (
    "abcxyzABCXYZ" + "sStTrReEvVmMlLdD" * 2 + "0123456789" + "''''" + "      " + "\t\n\r\n\n\r\x0b\x0c\x1c\x1f\x85\xa0"
    + "\u2028\u2029\u3000\u200b" + ".,;:!?-_()[]{}<>|/\\\"#@$%&*+=~`^" + "éüßçñÆøİıſΣσςǅʰ" + "\u0301\u0308\u0e31"
    + "中文字日本カタひら한국ไทยعربي" + "😀👍🏽\u200d♀\ufe0f🏳🌈" + "٣४１²½Ⅻ⑤"
)


def random_texts(seed: int, count: int) -> list[str]:
    """Strings mixing the tricky characters above with random assigned code points (Unicode as of Python's
    unicodedata: characters assigned later may have other classes in the regex engines)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randrange(0, 40)):
            if rng.random() < 0.15:
                c = chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0xFFFF),
                                    rng.randrange(0x10000, 0x20000)]))
                if unicodedata.category(c) not in ("Cn", "Cs"):
                    chars.append(c)
            else:
                chars.append(rng.choice(POOL))
        texts.append("".join(chars))
    return texts


SPLITS = [  # scanner, keep_gaps, the same split in tokenizers
    (llama3_match, True, pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")),
    (gpt2_match, True, pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated")),
    (clip_match, False, pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)),
]


@pytest.mark.parametrize("which", range(3), ids=["llama3", "gpt2", "clip"])
def test_scanner_equals_the_regex_in_tokenizers(which):
    match, keep_gaps, oracle = SPLITS[which]
    for text in random_texts(which, 3000) + TEXTS:
        assert split(text, match, keep_gaps) == [piece for piece, _ in oracle.pre_tokenize_str(text)], repr(text)


@pytest.mark.parametrize("which", range(3), ids=["llama3", "gpt2", "clip"])
def test_scanner_equals_the_regex_module(which):
    regex = pytest.importorskip("regex")
    match, keep_gaps, _ = SPLITS[which]
    pattern = regex.compile([LLAMA3_PATTERN, GPT2_PATTERN, CLIP_PATTERN][which])
    for text in random_texts(10 + which, 3000) + TEXTS:
        assert split(text, match, keep_gaps) == pattern.findall(text), repr(text)  # no gaps: each char starts a match


def test_clip_normalizer_equals_tokenizers(clip):
    ours, _ = clip
    oracle = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    for text in random_texts(20, 3000) + TEXTS:
        assert ours.normalize(text) == oracle.normalize_str(text), repr(text)


# --- LLaMA-3 (tokenizer/) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS + [TEMPLATE.format(t) for t in TEXTS[:4]])
def test_llama3_encode(llama3, text):
    ours, oracle = llama3
    assert ours.encode(text) == oracle(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == oracle(text, add_special_tokens=False)["input_ids"]


def test_llama3_ignore_merges(llama3):
    ours, oracle = llama3
    assert ours.encode(" zebra", add_special_tokens=False) == [ours.token_id("Ġzebra")] == oracle.encode(" zebra")[1:]


@pytest.mark.parametrize("max_sequence_length", [256, 40])  # 40: the prompts are cut
def test_llama3_batch_as_the_pipeline_calls_it(llama3, max_sequence_length):
    ours, oracle = llama3
    prompts = [TEMPLATE.format(t) for t in (TEXTS[2], TEXTS[3], TEXTS[5], TEXTS[17], "")]
    max_length = max_sequence_length + CROP_START
    expected = oracle(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = ours(prompts, max_length=max_length, padding="max_length", truncation=True)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (len(prompts), max_length)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert mask.all(1).any() and (max_sequence_length == 40 or not mask.all())  # some prompts cut, some padded


def test_llama3_padding_longest_and_truncation(llama3):
    ours, oracle = llama3
    expected = oracle(TEXTS, padding="longest", return_tensors="pt")
    ids, mask = ours(TEXTS, padding="longest", truncation=False)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    expected = oracle(TEXTS, max_length=7, padding="longest", truncation=True, return_tensors="pt")
    ids, mask = ours(TEXTS, max_length=7, padding="longest", truncation=True)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_llama3_special_tokens_by_name(llama3):
    ours, oracle = llama3
    for name in ["<|end_header_id|>", "<|start_header_id|>", "<|eot_id|>", "<image>", "<pad>", "<|begin_of_text|>",
                 "Ġthe", "a"]:
        assert ours.token_id(name) == oracle.convert_tokens_to_ids(name), name
    assert ours.pad_id == oracle.pad_token_id and ours.prefix == [oracle.bos_token_id] and ours.suffix == []
    with pytest.raises(KeyError, match="not-a-token"):
        ours.token_id("not-a-token")


def test_llama3_merges_written_as_strings(llama3, tmp_path):
    ours, _ = llama3
    other = BPETokenizer(write_llama3(tmp_path / "tokenizer", string_merges=True))
    assert isinstance(json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["model"]["merges"][0], str)
    for text in TEXTS:
        assert other.encode(text) == ours.encode(text)


def test_llama3_decode(llama3):
    ours, oracle = llama3
    for text in TEXTS:
        ids = oracle.encode(text)
        assert ours.decode(ids) == oracle.backend_tokenizer.decode(ids, skip_special_tokens=False)
        without_specials = oracle.backend_tokenizer.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=True) == without_specials


# --- CLIP (tokenizer_2/) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_clip_encode(clip, text):
    ours, oracle = clip
    assert ours.encode(text) == oracle(text)["input_ids"]


def test_clip_batch_as_the_pipeline_calls_it(clip):
    ours, oracle = clip
    prompts = TEXTS[2:8] + [TEXTS[17], ""]
    expected = oracle(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours(prompts, max_length=77, padding="max_length", truncation=True)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert mask.all(1).any() and not mask.all()  # some prompts were cut, some padded
    expected = oracle(prompts, padding="longest", return_tensors="pt")  # the untruncated ids, for the warning
    ids, mask = ours(prompts, padding="longest", truncation=False)
    assert ids.shape[1] > 77
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_clip_special_tokens_and_decode(clip):
    ours, oracle = clip
    for name in ["<|startoftext|>", "<|endoftext|>", "a</w>", "the</w>"]:
        assert ours.token_id(name) == oracle.convert_tokens_to_ids(name), name
    assert ours.pad_id == oracle.pad_token_id == oracle.eos_token_id
    for text in TEXTS:
        ids = oracle.encode(text)
        assert ours.decode(ids) == oracle.backend_tokenizer.decode(ids, skip_special_tokens=False)


def test_clip_from_a_tokenizer_json(clip, tmp_path):
    """A CLIP folder may carry tokenizer.json too (openai/clip-vit-large-patch14 does): the same ids."""
    ours, oracle = clip
    oracle.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["post_processor"]["type"] == "RobertaProcessing" and spec["model"]["end_of_word_suffix"] == "</w>"
    other = BPETokenizer(tmp_path)
    for text in TEXTS:
        assert other.encode(text) == ours.encode(text)


# --- failures -------------------------------------------------------------------------------------------------

def test_unknown_files_and_regexes_fail_early(tmp_path, llama3):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        BPETokenizer(tmp_path)
    folder = write_llama3(tmp_path / "other")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="not one of LLaMA-3's"):
        BPETokenizer(folder)
    ours, _ = llama3
    with pytest.raises(ValueError, match="truncation=True"):
        ours(["a long text " * 10], max_length=5, truncation=False)
