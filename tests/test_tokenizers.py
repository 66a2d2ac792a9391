"""Tokenizers: id parity with transformers' BertTokenizer / CLIPTokenizer on the bundled vocab files,
truncation and padding layout, SentencePiece (+ jieba) training and round trips, factory errors."""
import gzip
import json
import os
import unicodedata
import warnings

import numpy as np
import pytest

from pangu_draw_ms.config import ConfigError, TokenizerConfig
from pangu_draw_ms.tokenizers import (
    DATA_DIR,
    ClipBPETokenizer,
    SentencePieceTokenizer,
    WordPieceTokenizer,
    build_tokenizer,
    train,
)

BERT_VOCAB = os.path.join(DATA_DIR, "bert_chinese_vocab.txt")
CLIP_MERGES = os.path.join(DATA_DIR, "bpe_simple_vocab_16e6.txt.gz")

LONG_ENGLISH = ("a highly detailed matte painting of a medieval castle on a cliff above a stormy sea, "
                "dramatic lighting, volumetric clouds, seagulls, crashing waves, by greg rutkowski and "
                "thomas kinkade, trending on artstation, octane render, unreal engine 5, 8k, ultra wide "
                "angle, golden hour, cinematic composition, intricate stonework, banners in the wind, "
                "knights on horseback riding across the drawbridge, torches burning along the walls, a "
                "dragon circling the tallest tower, lightning striking the distant mountains")
LONG_CHINESE = "一座古老的城堡矗立在悬崖之上，下面是波涛汹涌的大海，" * 5

PROMPTS = [
    # English
    "a photo of a cat",
    "A Photo Of An Astronaut Riding A Horse On Mars, 4K, Trending On ArtStation!",
    "it's a dog's life; they're here, we've gone, I'm fine, you'll see, he'd go",
    "1024x1024 resolution, pi=3.14159, 2023-12-28, 100% ok",
    "what?!... (really) [yes] {no} <tag> @user #hashtag $100 a_b c-d e/f ~x^y `z` \"q\" |p|",
    # accents, other scripts, emoji, mojibake, full-width forms
    "Crème brûlée at the café, naïve façade, Zürich, São Paulo, Ångström, Øresund",
    "ΟΔΟΣ ΣΑΣ, İstanbul, STRASSE Straße",
    "東京タワーの夜景, 서울의 밤, Москва зимой, مرحبا بالعالم, नमस्ते",
    "a cute dog 🐶🐱 with sunglasses 😎 ❤️ 👨‍👩‍👧 ✨",
    "cafÃ© au lait",
    "ＡＢＣ１２３ full width",
    # whitespace and control oddities
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand   multiple   spaces",
    "ideographic\u3000space\u00a0nbsp zero\u200bwidth bell\x07char",
    # Chinese, with the release's style prefixes and rare characters
    "一只猫坐在草地上，阳光明媚。",
    "水墨画风格的山水，远处有瀑布和松树",
    "赛博朋克城市夜景，霓虹灯，雨天，高清8K",
    "義 一位穿着汉服的少女站在樱花树下",
    "饅 动漫风格的女孩，大眼睛",
    "霙 城市街头摄影，黑白",
    "“引号”、《书名号》……——！？（括号）",
    "生僻字：𠀀𪚥龘靐齉",
    # mixed
    "a panda 熊猫 eating bamboo 竹子 in 4K",
    "iPhone 15 Pro 拍摄的夕阳 sunset over 西湖",
    "Café 咖啡馆 ☕ 在巴黎, très chic",
    # long (truncated by __call__) and empty
    LONG_ENGLISH,
    LONG_CHINESE,
    "",
]


def _quiet_call(tokenizer, texts):
    """Batch call without the (expected) truncation warnings of the long prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(texts)


# ------------------------------------------------------------------------------------------
# BERT WordPiece vs transformers.BertTokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_pair():
    from transformers import BertTokenizer

    return WordPieceTokenizer(BERT_VOCAB), BertTokenizer(vocab_file=BERT_VOCAB)


def test_wordpiece_specials_and_size(bert_pair):
    ours, _ = bert_pair
    assert (ours.vocab_size, ours.pad_token_id, ours.unk_token_id, ours.start_token_id, ours.eot_token_id) == \
        (21128, 0, 100, 101, 102)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_wordpiece_matches_bert_tokenizer(bert_pair, prompt):
    ours, ref = bert_pair
    assert ours.tokenize(prompt) == ref.tokenize(prompt)
    assert ours.encode(prompt) == ref.encode(prompt)
    text_ids = ours.encode(prompt)[1:-1]
    assert ours.decode(ours.encode(prompt)) == ref.convert_tokens_to_string(ref.convert_ids_to_tokens(text_ids))


def test_wordpiece_batch_matches_bert_tokenizer(bert_pair):
    ours, ref = bert_pair
    batch = _quiet_call(ours, PROMPTS)
    expected = ref(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert batch.dtype == np.int32 and batch.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(batch, np.array(expected))


def test_wordpiece_unknown_and_overlong_words(bert_pair):
    ours, ref = bert_pair
    overlong = "a" * 101  # more than max_chars_per_word = 100 characters: one [UNK]
    for prompt in ["\u2603\u2603 snowman", overlong, "a" * 100]:
        assert ours.encode(prompt) == ref.encode(prompt)
    assert ours.tokenize(overlong) == ["[UNK]"]


# ------------------------------------------------------------------------------------------
# CLIP BPE vs transformers.CLIPTokenizer (with ftfy, as open_clip)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """Ours, and a CLIPTokenizer on a vocab.json/merges.txt derived from the same .gz file with
    transformers' own byte map."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode as ref_bytes_to_unicode

    lines = gzip.open(CLIP_MERGES, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1: 1 + 49152 - 256 - 2]
    byte_chars = list(ref_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_vocab")
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text("\n".join([lines[0]] + merges) + "\n", encoding="utf-8")
    # Positional: transformers 5 silently builds an empty tokenizer from keyword paths.
    ref = CLIPTokenizer(str(vocab_path), str(merges_path))
    # Without ftfy CLIPTokenizer falls back to BERT basic tokenization (splits CJK): not open_clip.
    assert ref.fix_text is not None, "ftfy must be installed for CLIPTokenizer to follow open_clip"
    return ClipBPETokenizer(CLIP_MERGES), ref


def test_clip_specials_and_size(clip_pair):
    ours, ref = clip_pair
    assert (ours.vocab_size, ours.start_token_id, ours.eot_token_id, ours.pad_token_id) == (49408, 49406, 49407, 0)
    assert ref.vocab_size == ours.vocab_size
    assert (ref.bos_token_id, ref.eos_token_id) == (ours.start_token_id, ours.eot_token_id)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_matches_clip_tokenizer(clip_pair, prompt):
    ours, ref = clip_pair
    assert ours.tokenize(prompt) == ref.tokenize(prompt)
    assert ours.encode(prompt) == ref.encode(prompt)
    text_ids = ours.encode(prompt)[1:-1]
    assert ours.decode(ours.encode(prompt)) == ref.convert_tokens_to_string(ref.convert_ids_to_tokens(text_ids))


def test_clip_batch_matches_clip_tokenizer_up_to_eot(clip_pair):
    """transformers pads with <|endoftext|>, open_clip (and we) with 0: equal up to the first EOT."""
    ours, ref = clip_pair
    batch = _quiet_call(ours, PROMPTS)
    expected = np.array(ref(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"])
    assert batch.dtype == np.int32 and batch.shape == (len(PROMPTS), 77)
    for row, ref_row, prompt in zip(batch, expected, PROMPTS):
        end = int(np.argmax(ref_row == ours.eot_token_id))
        np.testing.assert_array_equal(row[: end + 1], ref_row[: end + 1], err_msg=repr(prompt))
        assert (row[end + 1:] == 0).all(), f"{prompt!r}: padding after EOT must be 0"
        assert int(np.argmax(row)) == end, "pooling at argmax(ids) must find the EOT"


def test_clip_unescapes_html_like_open_clip(clip_pair):
    """open_clip HTML-unescapes twice; transformers does not, so compare with the unescaped text."""
    ours, ref = clip_pair
    assert ours.encode("fish &amp; chips &amp;lt;3") == ref.encode("fish & chips <3")


def test_clip_case_kept_without_lowercase(clip_pair):
    _, ref = clip_pair
    cased = ClipBPETokenizer(CLIP_MERGES, lowercase=False)
    ids = cased.encode("A Cat")
    assert ids != ref.encode("A Cat")  # CLIPTokenizer always lowercases
    assert cased.decode(ids) == "A Cat"


# ------------------------------------------------------------------------------------------
# Shared interface: padding layout, truncation, empty prompt, bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled(bert_pair, clip_pair):
    return {"wordpiece": bert_pair[0], "clip_bpe": clip_pair[0]}


@pytest.mark.parametrize("kind", ["wordpiece", "clip_bpe"])
def test_empty_prompt_is_start_end_then_padding(bundled, kind):
    tok = bundled[kind]
    row = tok("")[0]
    assert row[0] == tok.start_token_id and row[1] == tok.eot_token_id
    assert (row[2:] == tok.pad_token_id).all()
    assert tok.encode("") == [tok.start_token_id, tok.eot_token_id]


@pytest.mark.parametrize("kind", ["wordpiece", "clip_bpe"])
def test_truncation_keeps_end_token_and_warns(bundled, kind):
    tok = bundled[kind]
    ids = tok.encode(LONG_ENGLISH)
    assert len(ids) > tok.max_length
    with pytest.warns(UserWarning, match=rf"last {len(ids) - tok.max_length} text tokens were dropped"):
        row = tok(["a cat", LONG_ENGLISH])[1]
    assert list(row[:-1]) == ids[: tok.max_length - 1] and row[-1] == tok.eot_token_id

    exact = tok.encode("x " * 200)[: tok.max_length - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt of exactly max_length ids is not truncated
        row = tok(tok.decode(exact))[0]
    assert row[-1] == tok.eot_token_id and (row != tok.pad_token_id).all()


def test_bad_input_is_rejected(bundled):
    tok = bundled["clip_bpe"]
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="prompt string or a list"):
        tok(None)
    with pytest.raises(ValueError, match="at least one prompt"):
        tok([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])


# ------------------------------------------------------------------------------------------
# Factory and config
# ------------------------------------------------------------------------------------------


def test_build_tokenizer_resolves_bundled_vocabs():
    clip = build_tokenizer(TokenizerConfig())
    bert = build_tokenizer(TokenizerConfig(kind="wordpiece", max_length=52))
    assert isinstance(clip, ClipBPETokenizer) and clip.vocab_size == 49408
    assert isinstance(bert, WordPieceTokenizer) and bert("猫").shape == (1, 52)
    by_path = build_tokenizer(TokenizerConfig(kind="wordpiece", vocab=BERT_VOCAB))
    assert by_path.encode("一只猫") == bert.encode("一只猫")


def test_missing_vocab_names_path_and_bundled_files():
    with pytest.raises(FileNotFoundError, match=r"no_such_vocab\.txt.*bert_chinese_vocab\.txt.*bpe_simple"):
        build_tokenizer(TokenizerConfig(kind="wordpiece", vocab="no_such_vocab.txt"))


def test_config_rejects_inconsistent_tokenizer_settings():
    with pytest.raises(ConfigError, match="no bundled vocab"):
        TokenizerConfig(kind="sentencepiece")
    with pytest.raises(ConfigError, match=r"expected a \*\.txt file such as the bundled 'bert_chinese_vocab.txt'"):
        TokenizerConfig(kind="wordpiece", vocab="bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(ConfigError, match="for kind 'sentencepiece' only"):
        TokenizerConfig(kind="clip_bpe", jieba=True)


def test_malformed_vocab_files_are_rejected(tmp_path):
    not_gzip = tmp_path / "merges.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="not a readable gzip'd CLIP merges file"):
        ClipBPETokenizer(str(not_gzip))
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="need 48894 lines"):
        ClipBPETokenizer(str(short))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['\[CLS\]', '\[SEP\]'\]"):
        WordPieceTokenizer(str(vocab))


# ------------------------------------------------------------------------------------------
# SentencePiece (+ jieba), trained here
# ------------------------------------------------------------------------------------------

CAPTIONS = [
    "一只猫坐在草地上，阳光明媚", "一只小狗在公园里奔跑", "城市夜景，霓虹灯闪烁", "水墨画风格的山水画",
    "雪山下的湖泊倒映着蓝天", "穿着汉服的少女站在樱花树下", "秋天的森林里落满了黄叶", "海边的灯塔和日落",
    "一碗热气腾腾的拉面", "古老的城堡矗立在悬崖上", "赛博朋克风格的未来城市", "孩子们在雪地里堆雪人",
    "a photo of a cat sitting on the grass", "a dog running in the park", "city lights at night",
    "a mountain lake under a blue sky", "a lighthouse by the sea at sunset", "a bowl of hot ramen noodles",
    "an old castle on a cliff", "children building a snowman in the snow", "a cat and a dog playing",
    "sunset over the mountains", "a girl in a red dress", "a futuristic city with flying cars",
] * 4
SPM_VOCAB_SIZE = 120


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    return {jieba: train(CAPTIONS, str(folder / f"jieba_{jieba}"), SPM_VOCAB_SIZE, jieba=jieba)
            for jieba in (False, True)}


def test_sentencepiece_training_is_deterministic(spm_models, tmp_path):
    import sentencepiece as spm

    def pieces_and_scores(model_file):  # the file itself also records its own path
        sp = spm.SentencePieceProcessor(model_file=model_file)
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

    again = train(CAPTIONS, str(tmp_path / "again"), SPM_VOCAB_SIZE, jieba=False)
    assert pieces_and_scores(again) == pieces_and_scores(spm_models[False])


def test_sentencepiece_layout_and_round_trip(spm_models):
    tok = SentencePieceTokenizer(spm_models[False], max_length=64)
    assert (tok.vocab_size, tok.pad_token_id, tok.start_token_id, tok.eot_token_id) == (SPM_VOCAB_SIZE, 0, 2, 3)
    text = "a cat sitting in the park at sunset"
    ids = tok.encode(text)
    assert ids[0] == 2 and ids[-1] == 3 and not {0, 2, 3} & set(ids[1:-1])
    row = tok([text, ""])
    assert row.dtype == np.int32 and row.shape == (2, 64)
    assert list(row[0, : len(ids)]) == ids and (row[0, len(ids):] == 0).all()
    assert list(row[1, :3]) == [2, 3, 0]
    for caption in ["a dog running in the snow", "一只猫坐在草地上，阳光明媚", "城市夜景"]:
        # SentencePiece's NFKC normalisation turns the full-width comma into ",".
        expected = unicodedata.normalize("NFKC", caption)
        assert tok.decode(tok.encode(caption)) == expected
        assert tok.decode(tok([caption])[0]) == expected
    assert tok.decode(tok.encode("A Cat")) == "a cat"  # lowercased, as at training


def test_sentencepiece_jieba_segments_chinese(spm_models):
    import jieba

    plain = SentencePieceTokenizer(spm_models[False])
    segmented = SentencePieceTokenizer(spm_models[True], jieba=True)
    text = "穿着汉服的少女站在雪山下的湖泊"
    # jieba segments from the dictionary inside its package: no download, works offline.
    assert os.path.isfile(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"))
    words = list(jieba.Tokenizer().cut(text))
    assert len(words) > 3 and "".join(words) == text
    assert segmented.decode(segmented.encode(text)) == " ".join(words)
    assert plain.tokenize(text) != segmented.tokenize(text)
    # With jieba, every word starts a new piece: no piece straddles a word boundary.
    assert sum(piece.startswith("\u2581") for piece in segmented.tokenize(text)) == len(words)
    # English passes through segmentation unchanged (up to spacing).
    assert segmented.decode(segmented.encode("a cat in the park")) == "a cat in the park"


def test_jieba_prefix_dictionary_from_the_package_cache_is_jiebas(tmp_path, monkeypatch):
    """The prefix dictionary the segmenter gets from the package's pickle (built once, then read back; a damaged
    file rebuilt) equals the one jieba loads itself, and segments alike."""
    import jieba

    from pangu_draw_ms.tokenizers.sentencepiece_jieba import _load_prefix_dictionary

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reference = jieba.Tokenizer()
    reference.initialize()
    text = "穿着汉服的少女站在雪山下的湖泊，一只猫在公园里"

    def loaded():
        segmenter = jieba.Tokenizer()
        _load_prefix_dictionary(segmenter)
        assert segmenter.initialized and segmenter.total == reference.total and segmenter.FREQ == reference.FREQ
        assert list(segmenter.cut(text)) == list(reference.cut(text))
        return segmenter

    loaded()  # builds it from jieba's dictionary and writes the file
    [name] = os.listdir(tmp_path / "pangu_draw_ms" / "jieba")
    cached = tmp_path / "pangu_draw_ms" / "jieba" / name

    def no_build(_):
        raise AssertionError("rebuilt although the cache file is there")

    with monkeypatch.context() as patch:
        patch.setattr(jieba.Tokenizer, "gen_pfdict", staticmethod(no_build))
        loaded()  # read back
    cached.write_bytes(b"not a pickle")
    loaded()  # rebuilt, and written again
    assert os.listdir(cached.parent) == [name] and cached.stat().st_size > 1_000_000


def test_sentencepiece_truncation_and_factory(spm_models):
    tok = build_tokenizer(TokenizerConfig(kind="sentencepiece", vocab=spm_models[True], jieba=True, max_length=8))
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode(CAPTIONS[0] + CAPTIONS[1])
    with pytest.warns(UserWarning, match=rf"last {len(ids) - 8} text tokens were dropped"):
        row = tok(CAPTIONS[0] + CAPTIONS[1])[0]
    assert list(row) == ids[:7] + [tok.eot_token_id]


def test_sentencepiece_errors(tmp_path):
    import sentencepiece as spm

    no_pad = tmp_path / "no_pad"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(no_pad),
                                   vocab_size=SPM_VOCAB_SIZE,
                                   num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match="has no pad id"):
        SentencePieceTokenizer(str(no_pad) + ".model")
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train(CAPTIONS, str(tmp_path / "huge"), 100000)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train(["", " "], str(tmp_path / "empty"), 50)
    with pytest.raises(TypeError, match=r"texts \[1\] are not"):
        train(["a cat", None], str(tmp_path / "none"), 50)
    not_a_model = tmp_path / "bad.model"
    not_a_model.write_text("not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        SentencePieceTokenizer(str(not_a_model))
