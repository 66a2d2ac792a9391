"""Prompt tokenizers: BERT WordPiece (Chinese encoder), CLIP byte BPE (English encoder) and
SentencePiece (+ jieba) for encoders we train. All share :class:`Tokenizer`'s interface."""
from __future__ import annotations

import os

from ..config import TokenizerConfig
from .base import Tokenizer
from .clip_bpe import ClipBPETokenizer
from .sentencepiece_jieba import SentencePieceTokenizer, train
from .wordpiece import WordPieceTokenizer

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

__all__ = ["Tokenizer", "WordPieceTokenizer", "ClipBPETokenizer", "SentencePieceTokenizer", "train",
           "build_tokenizer", "resolve_vocab_path", "bundled_vocabs", "DATA_DIR"]


def bundled_vocabs() -> list:
    """File names of the vocabularies bundled in ``DATA_DIR``."""
    return sorted(f for f in os.listdir(DATA_DIR) if f != "NOTICE.md")


def resolve_vocab_path(vocab: str) -> str:
    """A bundled vocab's bare file name resolves to ``DATA_DIR``; anything else is a path."""
    if os.path.basename(vocab) == vocab and vocab in bundled_vocabs():
        return os.path.join(DATA_DIR, vocab)
    if os.path.isfile(vocab):
        return vocab
    raise FileNotFoundError(f"tokenizer vocab {vocab!r} not found: {os.path.abspath(vocab)!r} is not a file and "
                            f"{vocab!r} is not a bundled vocab; bundled in {DATA_DIR}: {bundled_vocabs()}")


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The tokenizer a :class:`TokenizerConfig` describes."""
    path = resolve_vocab_path(config.vocab)
    if config.kind == "wordpiece":
        return WordPieceTokenizer(path, max_length=config.max_length, lowercase=config.lowercase)
    if config.kind == "clip_bpe":
        return ClipBPETokenizer(path, max_length=config.max_length, lowercase=config.lowercase,
                                pad_with_end_token=config.pad_with_end_token)
    return SentencePieceTokenizer(path, max_length=config.max_length, lowercase=config.lowercase,
                                  jieba=config.jieba)
