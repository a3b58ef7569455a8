"""One tokenizer interface over the Rust `tokenizers` package (BERT-style WordPiece).

    tok = Tokenizer.from_path(".../tokenizer.json")        # or a BERT vocab.txt, or a directory holding either
    ids, mask = tok.encode(["a red circle"], max_len=16)   # int32 [1, 16]: [CLS] a red circle [SEP] [PAD] ...

`encode` adds [CLS] / [SEP] itself (whatever post-processor a tokenizer.json carries is bypassed), so every
tokenizer gives the same layout: [CLS] tokens [SEP] then pad_id; truncation keeps [SEP] last.
`train_wordpiece` builds a vocabulary offline (the embedded dataset's default tokenizer is made with it).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# Special tokens, BERT names first; a tokenizer.json of another family may use the alternatives.
_SPECIALS = {
    "pad": ("[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>"),
}


class Tokenizer:
    """Encodes texts to fixed-length int32 ids + masks; decodes ids back to text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        """Wraps a `tokenizers.Tokenizer`; its own truncation / padding settings are switched off."""
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = {}
        for name, candidates in _SPECIALS.items():
            found = [tokenizer.token_to_id(t) for t in candidates if tokenizer.token_to_id(t) is not None]
            if not found:
                raise ValueError(f"tokenizer has no {name} token (looked for {', '.join(candidates)})")
            ids[name] = found[0]
        self.pad_id: int = ids["pad"]
        self.cls_id: int = ids["cls"]
        self.sep_id: int = ids["sep"]
        self.mask_id: int = ids["mask"]
        self.unk_id: int = ids["unk"]

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a tokenizer.json, a lowercased BERT WordPiece vocab.txt, or a directory holding one of them."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"tokenizer path does not exist: {path}")
        if os.path.isdir(path):
            for name in ("tokenizer.json", "vocab.txt"):
                if os.path.exists(os.path.join(path, name)):
                    return cls.from_path(os.path.join(path, name))
            raise ValueError(f"no tokenizer.json or vocab.txt in directory: {path}")
        if path.endswith(".json"):
            return cls(tokenizers.Tokenizer.from_file(path))
        return cls(_bert_wordpiece(path))

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids [B, max_len] ([CLS] tokens [SEP] pad...) and int32 mask [B, max_len] (1 on real tokens)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single string in a list")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        ids = np.full((len(encodings), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(encodings), max_len), np.int32)
        for i, enc in enumerate(encodings):
            tokens = enc.ids[: max_len - 2]  # truncate the text, never the [SEP]
            n = len(tokens) + 2
            ids[i, 0] = self.cls_id
            ids[i, 1: n - 1] = tokens
            ids[i, n - 1] = self.sep_id
            mask[i, :n] = 1
        return ids, mask

    def decode(self, ids) -> list[str]:
        """Texts of an id array [B, L] (or [L]); special tokens and padding are dropped."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        # Drop pad/cls/sep by id too: a vocab.txt or foreign tokenizer.json may not flag them as special.
        drop = {self.pad_id, self.cls_id, self.sep_id}
        rows = [[int(i) for i in row if int(i) not in drop] for row in ids]
        return self._tok.decode_batch(rows, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Writes this tokenizer as a tokenizer.json that `from_path` reads back."""
        self._tok.save(os.fspath(path))

    def vocab(self) -> dict[str, int]:
        """token -> id, special tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def continuation_table(self) -> np.ndarray:
        """bool [vocab_size]: True for WordPiece continuation pieces ("##..."), which never start a word."""
        table = np.zeros(self.vocab_size, bool)
        for token, index in self._tok.get_vocab(with_added_tokens=True).items():
            table[index] = token.startswith("##")
        return table

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text (no special tokens); handy to check a vocabulary covers some words."""
        return self._tok.encode(text, add_special_tokens=False).tokens


def _bert_wordpiece(vocab_file: str) -> tokenizers.Tokenizer:
    """A lowercasing BERT WordPiece tokenizer from vocab.txt, assembled from public `tokenizers` parts."""
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Flag the specials the vocabulary has, so they are never split and decode can skip them.
    specials = [t for names in _SPECIALS.values() for t in names if tok.token_to_id(t) is not None]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def train_wordpiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024) -> str:
    """Builds a lowercased BERT WordPiece vocabulary offline; writes tokenizer.json + vocab.txt, returns the json path.

    The vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK], every character and its "##" continuation (so no word is
    ever [UNK]), then whole words. When all distinct words fit in `vocab_size` (the embedded dataset has ~100)
    they are all taken, sorted, which makes the result a pure function of the set of texts. Otherwise the Rust
    WordPiece trainer learns the subwords; its tie-breaking follows hash-map order, so that path is not
    byte-for-byte reproducible across runs.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    if len(vocab) + len(words - set(chars)) <= vocab_size:
        vocab += sorted(words - set(chars))
    else:
        trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
        trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                    special_tokens=vocab[:5], limit_alphabet=1000)
        known = set(vocab)
        learned = sorted(t for t in trainer.get_vocab() if t not in known)
        vocab += learned[: max(vocab_size - len(vocab), 0)]
    vocab_path = os.path.join(out_dir, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab))
    tok = _bert_wordpiece(vocab_path)
    # A standalone tokenizer.json adds [CLS] ... [SEP] like BERT's; Tokenizer.encode bypasses it.
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab.index("[SEP]")), ("[CLS]", vocab.index("[CLS]")))
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path
