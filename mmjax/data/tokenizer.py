"""One tokenizer interface over the Rust `tokenizers` package (BERT-style WordPiece).

    tok = Tokenizer.from_path(".../tokenizer.json")        # or a BERT vocab.txt, or a directory holding either
    ids, mask = tok.encode(["a red circle"], max_len=16)   # int32 [1, 16]: [CLS] a red circle [SEP] [PAD] ...

`encode` adds [CLS] / [SEP] itself (whatever post-processor a tokenizer.json carries is bypassed), so every
tokenizer gives the same layout: [CLS] tokens [SEP] then pad_id; truncation keeps [SEP] last.
`train_wordpiece` trains a vocabulary offline (the embedded dataset's default tokenizer is made with it).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

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
        return self._tok.decode_batch([row.tolist() for row in ids], skip_special_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text (no special tokens); handy to check a vocabulary covers some words."""
        return self._tok.encode(text, add_special_tokens=False).tokens


def _bert_wordpiece(vocab_file: str) -> tokenizers.Tokenizer:
    """A lowercasing BERT WordPiece tokenizer from vocab.txt, assembled from public `tokenizers` parts."""
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_wordpiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024) -> str:
    """Trains a lowercased WordPiece vocabulary offline; writes tokenizer.json + vocab.txt, returns the json path.

    Deterministic for a given text order. With the embedded dataset's ~100 distinct words the vocabulary saturates
    well below `vocab_size` (every word becomes one token), so the final size is whatever the corpus needs.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], limit_alphabet=1000)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    tok.save_model(out_dir)  # vocab.txt, for tools that want the BERT format
    return path
