"""SentencePiece tokenizer for text encoders we train ourselves, with optional jieba segmentation.

SentencePiece treats spaces as word boundaries; Chinese has none. With ``jieba=True`` a prompt is
first cut into words by jieba (its dictionary ships in the package, no network) and the words are
joined with spaces, so pieces never straddle a Chinese word boundary. The same normalisation
(lowercase, jieba) runs on the training texts in :func:`train` and on prompts in the tokenizer:
build the tokenizer with the flags the model was trained with. SentencePiece itself then applies
NFKC (full-width forms such as "，" become ASCII ",") and collapses whitespace.

Ids: ``[BOS] pieces [EOS]`` padded with ``pad_token_id``; :func:`train` lays out pad 0, unk 1,
bos 2, eos 3. The EOS id is the tokenizer's ``eot_token_id`` (it is not the largest id, so a text
encoder pooling at it must be told the id rather than take the argmax).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from typing import Iterable, List

import sentencepiece as spm

from .base import Tokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _jieba_segmenter():
    """One jieba tokenizer per process, shared by every normaliser. A private instance, not jieba's global one: its
    dictionary is the one shipped in the jieba package, its prefix dictionary read from the package's cache
    (:func:`_load_prefix_dictionary`). jieba logs its set-up at DEBUG level through a handler of its own; it
    follows our logger's level instead."""
    import jieba

    jieba.setLogLevel(logger.getEffectiveLevel())
    segmenter = jieba.Tokenizer()
    _load_prefix_dictionary(segmenter)
    return segmenter


def _load_prefix_dictionary(segmenter) -> None:
    """Give ``segmenter`` (a fresh ``jieba.Tokenizer`` of jieba's own dictionary) its prefix dictionary.

    jieba builds it from its dictionary (2 s) and caches it in the temporary folder with ``marshal``, whose load
    takes 1.0 s here, in every process that segments Chinese (each tools/*.py run, each msrun worker). The same
    two values (word -> frequency with every prefix of a word at 0, and the frequencies' total) as a pickle in
    the package's cache load in 0.2 s. The file is named by jieba's version and its dictionary file's size and
    time, written once atomically; one that does not load is rebuilt from the dictionary (and a cache folder
    that cannot be written only costs the build)."""
    import jieba

    from ..io.checkpoint import atomic_output
    from ..runtime import cache_home

    source = os.path.join(os.path.dirname(jieba.__file__), "dict.txt")
    stat = os.stat(source)
    key = hashlib.sha256(f"{jieba.__version__}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    path = os.path.join(cache_home(), "pangu_draw_ms", "jieba", f"prefix_dictionary_{key}.pickle")
    try:
        with open(path, "rb") as f:
            frequencies, total = pickle.load(f)
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError):
        frequencies, total = segmenter.gen_pfdict(segmenter.get_dict_file())
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_output(path) as partial, open(partial, "wb") as f:
                pickle.dump((frequencies, total), f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as error:  # a read-only cache folder: every process builds it
            logger.debug("jieba prefix dictionary not cached: %s", error)
    segmenter.FREQ, segmenter.total, segmenter.initialized = frequencies, total, True


class _Normalizer:
    """Text as the SentencePiece model sees it: optionally lowercased, optionally jieba-segmented."""

    def __init__(self, lowercase: bool, jieba: bool):
        self.lowercase = lowercase
        self.segmenter = _jieba_segmenter() if jieba else None

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.segmenter is not None:
            text = " ".join(word for word in self.segmenter.cut(text) if word.strip())
        return text


def train(texts: Iterable[str], model_prefix: str, vocab_size: int, *, lowercase: bool = True,
          jieba: bool = False, model_type: str = "unigram", character_coverage: float = 0.9995,
          seed: int = 0) -> str:
    """Train a SentencePiece model on ``texts``; returns the path of ``<model_prefix>.model``.

    Deterministic: one thread, no input sampling or shuffling, fixed random seed; runs offline.
    ``character_coverage`` below 1 lets rare CJK characters fall to ``<unk>`` instead of taking
    vocabulary slots.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"train() needs strings; texts {wrong[:5]} are not")
    normalize = _Normalizer(lowercase, jieba)
    sentences = [normalize(t) for t in texts]
    if not any(s.strip() for s in sentences):
        raise ValueError("train() needs at least one non-empty text")
    directory = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model_prefix {model_prefix!r}: directory {directory!r} does not exist")
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=model_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            minloglevel=2,  # errors only: its progress log is pages long
        )
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training of {model_prefix!r} failed: {err}") from None
    return model_prefix + ".model"


class SentencePieceTokenizer(Tokenizer):
    """``[BOS] pieces [EOS]`` padded with the model's pad id to ``max_length``."""

    def __init__(self, model_file: str, max_length: int = 77, lowercase: bool = True, jieba: bool = False):
        try:
            self.processor = spm.SentencePieceProcessor(model_file=model_file)
        except RuntimeError as err:
            raise ValueError(f"{model_file!r} is not a SentencePiece model: {err}") from None
        ids = {"pad": self.processor.pad_id(), "bos": self.processor.bos_id(), "eos": self.processor.eos_id()}
        missing = [name for name, i in ids.items() if i < 0]
        if missing:
            raise ValueError(f"SentencePiece model {model_file!r} has no {'/'.join(missing)} id; train it with "
                             "pad, bos and eos ids (pangu_draw_ms.tokenizers.sentencepiece_jieba.train does)")
        self.normalize = _Normalizer(lowercase, jieba)
        super().__init__(vocab_size=self.processor.get_piece_size(), max_length=max_length,
                         start_token_id=ids["bos"], eot_token_id=ids["eos"], pad_token_id=ids["pad"])

    def tokenize(self, text: str) -> List[str]:
        """Pieces of ``text`` (no special tokens)."""
        return self.processor.encode(self.normalize(text), out_type=str)

    def _text_to_ids(self, text: str) -> List[int]:
        return self.processor.encode(self.normalize(text), out_type=int)

    def _ids_to_text(self, ids: List[int]) -> str:
        # With jieba the text comes back segmented: words separated by spaces.
        return self.processor.decode(ids)
