"""A small tokenizer and trainable text encoder for report-guided pretraining (MedIM), no downloads.

* :class:`ReportTokenizer`: lower-cased words; the keyword vocabulary (organs, sides,
  findings; MeSH-like terms, replaceable with a user file of one term a line) gets reserved ids
  ``1..K`` so keywords are recognised exactly, every other word is hashed (CRC32, stable across
  processes) into ``buckets`` ids. Id 0 is padding. Sentences are split on ``.``/``;``/newlines.
* :class:`TextEncoder`: token embedding + learned positions + a few transformer layers.
  A user-provided pretrained text model can replace it: any module with the same
  ``forward(ids [N, T], padding [N, T] bool) -> [N, T, dim]`` assigned to ``method.text_encoder``.

Example::

    >>> tok = ReportTokenizer(DEFAULT_KEYWORDS, buckets=1024, max_len=32)
    >>> enc = tok(["A 12 mm lesion in the right liver.", None])
    >>> enc.ids.shape, enc.keyword[0].tolist()[:8]  # [2, 32]; keyword index or -1 per token
    >>> TextEncoder(tok.vocab_size, dim=64)(enc.ids, enc.padding).shape  # [2, 32, 64]
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

ORGANS = ("liver", "kidney", "lung", "spleen", "pancreas", "heart", "bone", "spine", "brain", "bladder",
          "stomach", "colon", "prostate", "breast", "thyroid", "gallbladder", "adrenal", "aorta")
SIDES = ("right", "left", "bilateral")
FINDINGS = ("lesion", "nodule", "mass", "tumor", "cyst", "hypodense", "hyperdense", "metastasis", "calcification",
            "effusion", "fracture", "opacity", "consolidation", "enhancement", "stenosis")
DEFAULT_KEYWORDS: tuple[str, ...] = ORGANS + SIDES + FINDINGS
_WORD = re.compile(r"[a-z]+|\d+")
_SENTENCE = re.compile(r"[.;\n]+")


def load_keywords(path: str | Path | None) -> tuple[str, ...]:
    """Keywords from a file (one term a line, ``#`` comments), or the built-in vocabulary."""
    if path is None:
        return DEFAULT_KEYWORDS
    words = []
    for line in Path(path).read_text().splitlines():
        term = line.split("#", 1)[0].strip().lower()
        if term and term not in words:
            words.append(term)
    if not words:
        raise ValueError(f"method.medim_vocab should name a file with at least one keyword, got {str(path)!r}.")
    return tuple(words)


class Encoded(NamedTuple):
    ids: torch.Tensor  # [N, T] long, 0 = padding
    padding: torch.Tensor  # [N, T] bool, True = padding
    keyword: torch.Tensor  # [N, T] long, index into the keyword vocabulary or -1
    sentence: torch.Tensor  # [N, T] long, sentence index of each token or -1 (padding)


class ReportTokenizer:
    """Word tokenizer with exact keyword ids and hashed other words (see module docstring)."""

    def __init__(self, keywords: Sequence[str] = DEFAULT_KEYWORDS, buckets: int = 4096, max_len: int = 64) -> None:
        # Multi-word terms ("pleural effusion") match on their last word.
        self.keywords = tuple(k.split()[-1] for k in keywords)
        self.index = {k: i for i, k in enumerate(self.keywords)}
        self.buckets = buckets
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return 1 + len(self.keywords) + self.buckets

    def word_id(self, word: str) -> int:
        if word in self.index:
            return 1 + self.index[word]
        return 1 + len(self.keywords) + zlib.crc32(word.encode()) % self.buckets

    def __call__(self, texts: Sequence[str | None]) -> Encoded:
        n, t = len(texts), self.max_len
        ids = torch.zeros(n, t, dtype=torch.long)
        kw = torch.full((n, t), -1, dtype=torch.long)
        sent = torch.full((n, t), -1, dtype=torch.long)
        for i, text in enumerate(texts):
            pos = 0
            for s, sentence in enumerate(_SENTENCE.split((text or "").lower())):
                for word in _WORD.findall(sentence):
                    if pos == t:
                        break
                    ids[i, pos] = self.word_id(word)
                    kw[i, pos] = self.index.get(word, -1)
                    sent[i, pos] = s
                    pos += 1
        return Encoded(ids, ids == 0, kw, sent)


class TextEncoder(nn.Module):
    """Embedding + learned positions + ``layers`` transformer encoder layers: ids -> [N, T, dim]."""

    def __init__(self, vocab_size: int, dim: int = 96, layers: int = 1, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        if dim % heads:
            heads = 1
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        # An all-padding row (no words) would make attention NaN: let it attend to position 0.
        pad = padding.clone()
        pad[:, 0] = False
        return self.norm(self.blocks(x, src_key_padding_mask=pad))


__all__ = ["DEFAULT_KEYWORDS", "Encoded", "ReportTokenizer", "TextEncoder", "load_keywords"]
