"""CLIP byte-level BPE tokenizer with open_clip semantics (the English OpenCLIP bigG encoder's).

1. cleanup: ``ftfy.fix_text`` (repairs mojibake), HTML-unescape twice, collapse whitespace,
   lowercase;
2. pre-tokens: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits, runs of
   other non-space characters;
3. each pre-token's UTF-8 bytes are written as printable characters (byte-to-unicode map), its last
   symbol gets the end-of-word mark ``</w>``, and adjacent symbols are merged by rank (lowest first)
   until no adjacent pair is in the merges table.

Vocabulary (49,408 ids): the 256 byte characters, the same with ``</w>``, one entry per merge,
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). Padding is id 0 (as open_clip pads;
transformers' CLIPTokenizer pads with ``<|endoftext|>`` instead). Special-token strings typed in a
prompt are ordinary text here, never special ids.
"""
from __future__ import annotations

import functools
import gzip
import html
from typing import Dict, List, Tuple

import ftfy
import regex

from .base import Tokenizer

# CLIP uses the first 48,894 merges of the file: 512 byte symbols + 48,894 merges + 2 specials
# = 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

_PRE_TOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """A printable character for each byte: printable Latin-1 bytes stand for themselves, the other
    68 (controls, space, soft hyphen...) get the characters from U+0100 on, in byte order.

    The dict's order is the vocabulary's: the 188 printable bytes first, then the other 68."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def load_merges(path: str) -> List[Tuple[str, str]]:
    """The CLIP merges (pairs of symbols, highest priority first) from the gzip'd merges file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as err:
        raise ValueError(f"{path!r} is not a readable gzip'd CLIP merges file such as "
                         f"bpe_simple_vocab_16e6.txt.gz: {err}") from None
    # Line 0 is a version header ("#version: 0.2").
    merges = [tuple(line.split()) for line in lines[1: 1 + NUM_MERGES]]
    bad = [i + 2 for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(f"{path!r} is not a CLIP merges file: need {NUM_MERGES} lines 'a b' after the header, "
                         f"found {len(merges)} lines" + (f", malformed at line(s) {bad[:5]}" if bad else ""))
    return merges


def clean_text(text: str, lowercase: bool = True) -> str:
    """open_clip's cleanup: fix mojibake, unescape HTML entities, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split())
    return text.lower() if lowercase else text


class ClipBPETokenizer(Tokenizer):
    """CLIP byte-level BPE: ``<|startoftext|> ids <|endoftext|>``, zero-padded to ``max_length``
    (open_clip, PanGu-Draw's English encoder) or, with ``pad_with_end_token``, padded with
    ``<|endoftext|>`` (transformers' CLIPTokenizer, the tokenizer of Stable Diffusion 1.x)."""

    def __init__(self, merges_file: str, max_length: int = 77, lowercase: bool = True,
                 pad_with_end_token: bool = False):
        merges = load_merges(merges_file)
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        symbols = list(self.byte_to_char.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.lowercase = lowercase
        # Per instance, bounded: prompts repeat words, a long-running server sees unbounded new ones.
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)
        super().__init__(vocab_size=len(vocab), max_length=max_length, start_token_id=self.encoder[START_OF_TEXT],
                         eot_token_id=self.encoder[END_OF_TEXT],
                         pad_token_id=self.encoder[END_OF_TEXT] if pad_with_end_token else 0)

    def _bpe(self, pre_token: str) -> Tuple[str, ...]:
        """BPE symbols of one byte-mapped pre-token."""
        word = [*pre_token[:-1], pre_token[-1] + END_OF_WORD]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.merge_ranks.get(pair, NUM_MERGES))
            if best not in self.merge_ranks:
                break
            merged = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def tokenize(self, text: str) -> List[str]:
        """BPE symbols of ``text`` (no special tokens)."""
        symbols = []
        for pre_token in _PRE_TOKEN.findall(clean_text(text, self.lowercase)):
            symbols.extend(self.bpe("".join(self.byte_to_char[b] for b in pre_token.encode("utf-8"))))
        return symbols

    def _text_to_ids(self, text: str) -> List[int]:
        return [self.encoder[symbol] for symbol in self.tokenize(text)]

    def _ids_to_text(self, ids: List[int]) -> str:
        data = bytes(self.char_to_byte[c] for c in "".join(self.decoder[i] for i in ids))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()
