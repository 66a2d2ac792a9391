"""BERT WordPiece tokenizer (the Chinese text encoder's, vocab ``bert_chinese_vocab.txt``).

Two stages, as in BERT:
1. basic tokenization: drop control characters, turn every whitespace into a space, put spaces
   around CJK ideographs (each becomes a word), NFC-normalise, split on whitespace, lowercase and
   strip accents, split off every punctuation character;
2. WordPiece: each word becomes the longest vocabulary entry that starts it, then the longest
   ``##``-prefixed entry that continues it, and so on; a word with a part that no entry matches, or
   longer than ``max_chars_per_word``, becomes ``[UNK]``.

Output ids: ``[CLS] ids [SEP]`` zero-padded (``[PAD]`` = 0). Special-token strings typed in a
prompt (``[CLS]``) are ordinary text here, never special ids.
"""
from __future__ import annotations

import unicodedata
from typing import Dict, List

from .base import Tokenizer

# (first, last) code points of the CJK ideograph blocks BERT splits into single characters.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(first <= cp <= last for first, last in _CJK_RANGES)


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    # \t \n \r are control characters to Unicode but whitespace to BERT.
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    # All non-alphanumeric printable ASCII counts ($ ^ ` are symbols, not punctuation, to Unicode).
    cp = ord(char)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(char).startswith("P")


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> List[str]:
    pieces: List[str] = []
    run = ""
    for char in word:
        if _is_punctuation(char):
            if run:
                pieces.append(run)
                run = ""
            pieces.append(char)
        else:
            run += char
    if run:
        pieces.append(run)
    return pieces


def basic_tokenize(text: str, lowercase: bool = True) -> List[str]:
    """BERT basic tokenization: the words that WordPiece then splits."""
    # Lowercase each character on its own, as transformers' BertTokenizer does: str.lower() of a
    # whole word would turn a final capital sigma into the final-form "ς".
    if lowercase:
        text = "".join(c.lower() for c in text)
    chars = []
    for char in text:
        if char in ("\x00", "\ufffd") or _is_control(char):
            continue
        if _is_whitespace(char):
            chars.append(" ")
        elif _is_cjk(char):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    words = []
    for word in unicodedata.normalize("NFC", "".join(chars)).split():
        if lowercase:
            word = _strip_accents(word)
        words.extend(_split_punctuation(word))
    return words


def load_wordpiece_vocab(path: str) -> Dict[str, int]:
    """``{token: id}`` from a vocab.txt (one token per line, id = line number)."""
    vocab: Dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\r\n")] = index
    return vocab


class WordPieceTokenizer(Tokenizer):
    """BERT tokenizer: ``[CLS] wordpieces [SEP]``, zero-padded to ``max_length``."""

    def __init__(self, vocab_file: str, max_length: int = 77, lowercase: bool = True,
                 max_chars_per_word: int = 100):
        self.vocab = load_wordpiece_vocab(vocab_file)
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"WordPiece vocab {vocab_file!r} lacks the special token(s) {missing}; "
                             "a BERT vocab.txt holds [PAD] [UNK] [CLS] [SEP]")
        self.tokens = {i: t for t, i in self.vocab.items()}
        self.lowercase = lowercase
        self.max_chars_per_word = max_chars_per_word
        self.unk_token_id = self.vocab["[UNK]"]
        super().__init__(vocab_size=len(self.vocab), max_length=max_length, start_token_id=self.vocab["[CLS]"],
                         eot_token_id=self.vocab["[SEP]"], pad_token_id=self.vocab["[PAD]"])

    def wordpiece(self, word: str) -> List[str]:
        """Greedy longest-match-first split of one word; ``["[UNK]"]`` when it cannot be split."""
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            prefix = "##" if start else ""
            for end in range(len(word), start, -1):
                piece = prefix + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> List[str]:
        """Word pieces of ``text`` (no special tokens)."""
        return [piece for word in basic_tokenize(text, self.lowercase) for piece in self.wordpiece(word)]

    def _text_to_ids(self, text: str) -> List[int]:
        return [self.vocab[piece] for piece in self.tokenize(text)]

    def _ids_to_text(self, ids: List[int]) -> str:
        # Word pieces joined by spaces, "##" continuations glued back on (so CJK comes out spaced).
        return " ".join(self.tokens[i] for i in ids).replace(" ##", "")
