"""Byte-level BPE tokenizers, read from their published files: LLaMA-3's `tokenizer.json` and CLIP's `vocab.json` +
`merges.txt`. HunyuanVideo-I2V encodes its prompt with both (the LLaVA-LLaMA-3 text encoder and CLIP-L).

One text goes through five steps, as in Hugging Face's `tokenizers` library, whose results these are:
  1. added tokens: special strings (`<|eot_id|>`, `<image>`, ...) written in the text become their ids as they are;
  2. normalizer: CLIP cleans the text (NFC, each whitespace run -> one space, lower case); LLaMA-3 does nothing;
  3. pre-tokenizer: a regex cuts the text into words, and each word's UTF-8 bytes are spelled with 256 printable
     characters ("byte level": a space is "Ġ", a newline "Ċ");
  4. BPE: each word starts as its characters (CLIP marks the last one with `</w>`), and the adjacent pair with the
     best (lowest) merge rank is joined, again and again, until no pair has a rank;
  5. post-processor: the ids are wrapped in the template's special tokens (LLaMA-3: BOS; CLIP: BOS ... EOS).
The regexes use Unicode classes (\\p{L} letters, \\p{N} numbers) that Python's `re` lacks, so each known regex is
a small hand-written scanner over `unicodedata` categories, equal to the regex on every input.
"""

import functools
import json
import re
import unicodedata
from pathlib import Path

import torch

# --- the pre-tokenizer regexes, as scanners -------------------------------------------------------------------

# \s of the regex engines: the Unicode White_Space property (not str.isspace, which adds \x1c-\x1f)
WHITE_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000").union(
    map(chr, range(0x2000, 0x200b)))  # and U+2000..U+200A
RUN = {kind: re.compile(kind + "+") for kind in "LNSP"}
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CLIP_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@functools.lru_cache(maxsize=None)
def char_kind(c: str) -> str:
    """S: white space, L: letter (\\p{L}), N: number (\\p{N}), P: anything else (punctuation, symbols, marks...)."""
    if c in WHITE_SPACE:
        return "S"
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "P"


def contraction_end(text: str, i: int, ignore_case: bool) -> int | None:
    """End of `'s|'t|'re|'ve|'m|'ll|'d` at i, None if none matches. Case-insensitive means by case folding,
    character by character, as the regex engine does: 'S and also 'ſ (long s) match 's."""
    if text[i] != "'":
        return None
    for tail in CONTRACTIONS:
        word = text[i + 1 : i + 1 + len(tail)]
        folded = len(word) == len(tail) and all(a.casefold() == b for a, b in zip(word, tail))
        if word == tail or (ignore_case and folded):
            return i + 1 + len(tail)
    return None


def llama3_match(text: str, kinds: str, i: int) -> int:
    """End of LLAMA3_PATTERN's match at i: the first of its alternatives that matches, as the regex tries them."""
    n, kind = len(text), kinds[i]
    end = contraction_end(text, i, ignore_case=True)
    if end is not None:
        return end
    if kind == "L":  # [^\r\n\p{L}\p{N}]?\p{L}+ : letters, with one space or symbol (not a line break) in front
        return RUN["L"].match(kinds, i).end()
    if kind in "SP" and text[i] not in "\r\n" and i + 1 < n and kinds[i + 1] == "L":
        return RUN["L"].match(kinds, i + 1).end()
    if kind == "N":  # \p{N}{1,3}
        return min(RUN["N"].match(kinds, i).end(), i + 3)
    start = i + 1 if text[i] == " " and i + 1 < n and kinds[i + 1] == "P" else i
    if kinds[start] == "P":  # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        end = RUN["P"].match(kinds, start).end()
        while end < n and text[end] in "\r\n":
            end += 1
        return end
    end = RUN["S"].match(kinds, i).end()  # white space from here on
    line_break = max(text.rfind("\r", i, end), text.rfind("\n", i, end))
    if line_break >= 0:  # \s*[\r\n]+ : up to the run's last line break
        return line_break + 1
    if end < n and end - i > 1:  # \s+(?!\S) : the last space goes with the next word
        return end - 1
    return end  # \s+


def gpt2_match(text: str, kinds: str, i: int) -> int:
    """End of GPT2_PATTERN's match at i (the regex of a ByteLevel pre-tokenizer with use_regex)."""
    end = contraction_end(text, i, ignore_case=False)
    if end is not None:
        return end
    start = i + 1 if text[i] == " " and i + 1 < len(text) and kinds[i + 1] != "S" else i
    if kinds[start] != "S":  # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
        return RUN[kinds[start]].match(kinds, start).end()
    end = RUN["S"].match(kinds, i).end()
    return end - 1 if end < len(text) and end - i > 1 else end  # \s+(?!\S), else \s+


def clip_match(text: str, kinds: str, i: int) -> int | None:
    """End of CLIP_PATTERN's match at i; None on white space, which no alternative matches."""
    for special in ("<|startoftext|>", "<|endoftext|>"):
        if text.startswith(special, i):
            return i + len(special)
    end = contraction_end(text, i, ignore_case=False)
    if end is not None:
        return end
    kind = kinds[i]
    if kind == "N":  # one digit at a time
        return i + 1
    return RUN[kind].match(kinds, i).end() if kind in "LP" else None


SCANNERS = {LLAMA3_PATTERN: llama3_match, GPT2_PATTERN: gpt2_match, CLIP_PATTERN: clip_match}


def split(text: str, match, keep_gaps: bool) -> list[str]:
    """The regex's matches in `text`, left to right (as re.finditer), with the text between them if keep_gaps."""
    kinds = "".join(map(char_kind, text))
    pieces, i, gap = [], 0, 0
    while i < len(text):
        end = match(text, kinds, i)
        if end is None:
            i += 1
            continue
        if keep_gaps and gap < i:
            pieces.append(text[gap:i])
        pieces.append(text[i:end])
        i = gap = end
    if keep_gaps and gap < len(text):
        pieces.append(text[gap:])
    return pieces


def byte_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 bytes: printable Latin-1 bytes stand for themselves, the 68 others (controls,
    space, no-break space, soft hyphen) take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, moved = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + moved))
        moved += b not in printable
    return chars


BYTE_CHARS = byte_alphabet()
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}


# --- CLIP's files, as the tokenizer.json they stand for -------------------------------------------------------

def clip_spec(folder: Path, config: dict) -> dict:
    """The tokenizer.json equivalent of CLIP's vocab.json + merges.txt: the pipeline transformers' CLIPTokenizer
    builds around them (ftfy is not used)."""
    def content(token):
        return token["content"] if isinstance(token, dict) else token

    bos, eos = content(config.get("bos_token", "<|startoftext|>")), content(config.get("eos_token", "<|endoftext|>"))
    unk = content(config.get("unk_token", "<|endoftext|>"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    if "added_tokens_decoder" in config:
        added = [{**token, "id": int(i)} for i, token in config["added_tokens_decoder"].items()]
    else:
        names = dict.fromkeys([bos, eos, unk, content(config.get("pad_token", "<|endoftext|>"))])
        added = [{"id": vocab[name], "content": name, "normalized": False, "special": True} for name in names]
    return {
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "unk_token": unk, "end_of_word_suffix": "</w>"},
        "post_processor": {"type": "RobertaProcessing", "cls": [bos, vocab[bos]], "sep": [eos, vocab[eos]]},
        "decoder": {"type": "ByteLevel"},
    }


def lowercase(text: str) -> str:
    """Character by character, as Rust's char::to_lowercase: no final-sigma rule (str.lower has one)."""
    return "".join(c.lower() for c in text)


WHITE_SPACE_RUN = re.compile("[" + "".join(sorted(WHITE_SPACE)) + "]+")
NORMALIZERS = {"NFC": lambda text: unicodedata.normalize("NFC", text), "Lowercase": lowercase}


# --- the tokenizer --------------------------------------------------------------------------------------------

class BPETokenizer:
    """Prompt -> token ids, as transformers' fast tokenizer gives them for the same folder.

    `BPETokenizer(folder)` reads `tokenizer.json` when the folder has one (LLaMA-3), else CLIP's `vocab.json` +
    `merges.txt`; `tokenizer_config.json` beside them gives the padding token and side. Calls:
      tok(texts, max_length, padding="max_length" | "longest", truncation=True) -> ids, attention_mask (B, L) int64
      tok.encode(text) -> ids with the template's special tokens;  tok.token_id("<|eot_id|>") -> int
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            if config.get("tokenizer_class", "CLIPTokenizer") != "CLIPTokenizer":
                raise ValueError(f"{folder}: vocab.json + merges.txt are read as CLIPTokenizer's, "
                                 f"not {config['tokenizer_class']}'s")
            spec = clip_spec(folder, config)
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
        self._read_model(spec["model"])
        self.normalize = self._read_normalizer(spec.get("normalizer"))
        self._read_added_tokens(spec.get("added_tokens") or [])
        self.splits = self._read_pre_tokenizer(spec.get("pre_tokenizer"))
        self.prefix, self.suffix = self._read_post_processor(spec.get("post_processor"))
        pad = config.get("pad_token")
        self.pad_id = self.token_id(pad["content"] if isinstance(pad, dict) else pad) if pad else None
        self.padding_side = config.get("padding_side", "right")
        self.cache: dict[str, list[int]] = {}

    # reading tokenizer.json
    def _read_model(self, model: dict):
        if model.get("type", "BPE") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
            raise ValueError("only byte-level BPE without byte_fallback or dropout is supported")
        if model.get("continuing_subword_prefix"):
            raise ValueError("BPE continuing_subword_prefix is not supported")
        self.vocab: dict[str, int] = model["vocab"]
        self.word_end = model.get("end_of_word_suffix") or ""
        self.ignore_merges = model.get("ignore_merges", False)  # a word that is in the vocabulary is one token
        self.unk_id = self.vocab[model["unk_token"]] if model.get("unk_token") else None
        self.merge_rank = {}
        for rank, merge in enumerate(model["merges"]):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            if left + right not in self.vocab:
                raise ValueError(f"merge {left!r} + {right!r}: the result is not in the vocabulary")
            self.merge_rank[left, right] = rank
        self.tokens = {i: token for token, i in self.vocab.items()}

    def _read_added_tokens(self, added: list[dict]):
        for token in added:
            if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
                raise ValueError(f"added token {token['content']!r}: lstrip/rstrip/single_word are not supported")
            self.tokens[token["id"]] = token["content"]
        self.added = {token["content"]: token["id"] for token in added}
        self.added.update({self.normalize(t["content"]): t["id"] for t in added if t.get("normalized")})
        self.special_ids = {token["id"] for token in added if token.get("special")}
        # raw text is matched against the tokens with normalized=False, normalized text against the others
        self.raw_added = self._alternation([t["content"] for t in added if not t.get("normalized")])
        self.normalized_added = self._alternation([self.normalize(t["content"]) for t in added if t.get("normalized")])

    @staticmethod
    def _alternation(contents: list[str]) -> re.Pattern | None:
        """A regex that finds the leftmost, then longest, of these strings (capturing it, for re.split)."""
        longest_first = sorted(set(contents), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if contents else None

    def _read_normalizer(self, spec: dict | None):
        if spec is None:
            return lambda text: text
        if spec["type"] == "Sequence":
            steps = [self._read_normalizer(step) for step in spec["normalizers"]]
            return lambda text: functools.reduce(lambda t, step: step(t), steps, text)
        if spec["type"] == "Replace" and spec["pattern"] == {"Regex": r"\s+"}:
            return lambda text: WHITE_SPACE_RUN.sub(spec["content"], text)
        if spec["type"] in NORMALIZERS:
            return NORMALIZERS[spec["type"]]
        raise ValueError(f"normalizer {spec} is not supported")

    def _read_pre_tokenizer(self, spec: dict | None) -> list:
        """-> the regex splits in order, as (scanner, keep_gaps); the words are then spelled in bytes."""
        steps = spec["pretokenizers"] if spec and spec["type"] == "Sequence" else [spec] if spec else []
        splits, byte_level = [], False
        for step in steps:
            if byte_level:
                raise ValueError("a pre-tokenizer after ByteLevel is not supported")
            pattern = step.get("pattern", {}).get("Regex")
            if step["type"] == "Split" and pattern not in SCANNERS:
                raise ValueError(f"pre-tokenizer regex {pattern!r} is not one of LLaMA-3's, GPT-2's or CLIP's")
            mode = (step.get("behavior"), step.get("invert"))
            if step["type"] == "Split" and mode in (("Isolated", False), ("Removed", True)):
                splits.append((SCANNERS[pattern], mode[0] == "Isolated"))  # Removed + invert: keep the matches only
            elif step["type"] == "ByteLevel" and not step.get("add_prefix_space"):
                if step.get("use_regex", True):
                    splits.append((gpt2_match, True))
                byte_level = True
            else:
                raise ValueError(f"pre-tokenizer {step} is not supported")
        if not byte_level:
            raise ValueError("the pre-tokenizer has no ByteLevel step: not a byte-level BPE")
        return splits

    def _read_post_processor(self, spec: dict | None) -> tuple[list[int], list[int]]:
        """-> the ids the template puts before and after the text's."""
        if spec is None or spec["type"] == "ByteLevel":
            return [], []
        if spec["type"] == "Sequence":
            parts = [self._read_post_processor(step) for step in spec["processors"]]
            return [i for p, _ in parts for i in p], [i for _, s in parts for i in s]
        if spec["type"] == "RobertaProcessing":
            return [spec["cls"][1]], [spec["sep"][1]]
        if spec["type"] == "TemplateProcessing":
            names = [next(iter(item.values()))["id"] for item in spec["single"]]
            if names.count("A") != 1:
                raise ValueError(f"template {names} does not hold the text exactly once")
            ids = [spec["special_tokens"][name]["ids"] if name != "A" else None for name in names]
            at = names.index("A")
            return [i for part in ids[:at] for i in part], [i for part in ids[at + 1:] for i in part]
        raise ValueError(f"post-processor {spec['type']} is not supported")

    # encoding
    def token_id(self, token: str) -> int:
        """Id of a token written as a string, special or not (`<|end_header_id|>`, `<pad>`, `Ġthe`)."""
        if token in self.added:
            return self.added[token]
        if token in self.vocab:
            return self.vocab[token]
        raise KeyError(f"token {token!r} is neither an added token nor in the vocabulary")

    def _bpe(self, word: str) -> list[int]:
        """Ids of one byte-level word."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        symbols = list(word)
        symbols[-1] += self.word_end
        while len(symbols) > 1:
            pairs = enumerate(zip(symbols, symbols[1:]))
            ranked = [(self.merge_rank[pair], i) for i, pair in pairs if pair in self.merge_rank]
            if not ranked:
                break
            _, i = min(ranked)  # best rank, leftmost among equals
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        ids = [self.vocab.get(symbol, self.unk_id) for symbol in symbols]
        return [i for i in ids if i is not None]  # no unk token: unknown characters are dropped

    def _encode_words(self, text: str) -> list[int]:
        """Ids of a text without added tokens: pre-tokenize, spell in bytes, BPE."""
        words = [text]
        for match, keep_gaps in self.splits:
            words = [piece for word in words for piece in split(word, match, keep_gaps)]
        ids = []
        for word in words:
            word = "".join(BYTE_CHARS[b] for b in word.encode("utf-8"))
            if word not in self.cache:
                if len(self.cache) > 100_000:
                    self.cache.clear()
                self.cache[word] = self._bpe(word)
            ids += self.cache[word]
        return ids

    @staticmethod
    def _split_added(text: str, pattern: re.Pattern | None) -> list[tuple[str, bool]]:
        """-> (piece, is an added token) in order."""
        parts = pattern.split(text) if pattern else [text]
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]  # odd parts are the captured tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text, inside the template's special tokens (BOS for LLaMA-3, BOS/EOS for CLIP) if asked."""
        ids = []
        for raw, is_token in self._split_added(text, self.raw_added):
            if is_token:
                ids.append(self.added[raw])
                continue
            for piece, is_token in self._split_added(self.normalize(raw), self.normalized_added):
                ids += [self.added[piece]] if is_token else self._encode_words(piece)
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def __call__(self, texts: list[str] | str, max_length: int | None = None, padding: str = "max_length",
                 truncation: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask: (B, L) int64, L = max_length ("max_length") or the longest ("longest").
        Truncation (to max_length; none without one) keeps the template's special tokens and the text's first ids."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = [self.encode(text, add_special_tokens=False) for text in texts]
        if truncation and max_length is not None:
            rows = [row[: max(max_length - len(self.prefix) - len(self.suffix), 0)] for row in rows]
        rows = [self.prefix + row + self.suffix for row in rows]
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding {padding!r} is neither 'max_length' nor 'longest'")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs a max_length")
        length = max_length if padding == "max_length" else max(map(len, rows))
        if any(len(row) > length for row in rows):
            raise ValueError(f"a text has more than max_length={length} tokens: pass truncation=True")
        if any(len(row) < length for row in rows) and self.pad_id is None:
            raise ValueError("padding needs a pad_token in tokenizer_config.json")
        input_ids = torch.full((len(rows), length), self.pad_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(0, len(row)) if self.padding_side == "right" else slice(length - len(row), length)
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        return input_ids, attention_mask

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ids: the byte-level spelling undone (a token that is not byte-spelled is taken as written)."""
        data = b""
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.tokens[i]
            spelled = all(c in CHAR_BYTES for c in token)
            data += bytes(CHAR_BYTES[c] for c in token) if spelled else token.encode("utf-8")
        text = data.decode("utf-8", errors="replace")
        return text.replace(self.word_end, " ").strip() if self.word_end else text
