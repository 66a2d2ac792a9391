"""The prompt enhancer: mindformers LLaMA against transformers, the decoding loop, SFT training, errors."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from pangu_draw_ms.prompting.config import DecodingConfig, load_enhancer_config
from pangu_draw_ms.prompting.decoding import choose_token

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = 3  # pangu_draw_ms.tokenizers.train lays out pad 0, unk 1, bos 2, eos 3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """400 demo prompt pairs, the held-out short prompts and a 200-piece tokenizer trained on the pairs."""
    from pangu_draw_ms.prompting.demo_pairs import write_pairs

    directory = str(tmp_path_factory.mktemp("pairs"))
    write_pairs(directory, 400, seed=0)
    return directory


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, pairs):
    """A transformers LlamaForCausalLM with seeded random weights (grouped-query attention, untied head), saved
    as a folder, and the same model converted by ``tools/convert.py llama`` into an enhancer directory."""
    from pangu_draw_ms.cli.convert import main as convert

    folder = str(tmp_path_factory.mktemp("hf_llama"))
    config = transformers.LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=EOS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init: logits that differ between tokens
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    out = str(tmp_path_factory.mktemp("converted"))
    assert convert(["llama", folder, "--tokenizer", os.path.join(pairs, "tokenizer.model"), "--out", out]) == 0
    return model, out


def test_converted_llama_matches_transformers(hf_llama):
    """mindformers' LlamaForCausalLM with the converted weights: transformers' logits within 1e-4 (relative)."""
    from pangu_draw_ms.prompting.enhancer import PromptEnhancer

    model, directory = hf_llama
    enhancer = PromptEnhancer.from_dir(directory)
    ids = np.random.default_rng(0).integers(4, 200, (2, enhancer.config.max_length)).astype(np.int32)
    ours = enhancer.logits_of(ids)
    with torch.no_grad():
        reference = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - reference).max() / np.abs(reference).max() < 1e-4


def test_greedy_continuations_match_transformers(hf_llama):
    """Greedy decoding of three prompts of different lengths in one right-padded batch gives transformers'
    ``generate(do_sample=False)`` continuation of each prompt alone."""
    from pangu_draw_ms.prompting.decoding import generate
    from pangu_draw_ms.prompting.enhancer import PromptEnhancer

    model, directory = hf_llama
    enhancer = PromptEnhancer.from_dir(directory)
    prompts = [[2, 17, 45, EOS], [2, 99, EOS], [2, 5, 6, 7, 8, 150, EOS]]
    ours = generate(enhancer.logits_of, prompts, DecodingConfig(max_new_tokens=10), max_length=24,
                    eos_token_id=EOS, pad_token_id=0)
    for prompt, (continuation,) in zip(prompts, ours):
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        expected = output[:output.index(EOS)] if EOS in output else output
        assert continuation == expected
    assert any(len(c[0]) >= 3 for c in ours)  # the comparison covers real continuations


def test_sampling_is_seeded_and_reproducible(hf_llama):
    """Temperature/top-p sampling: the same seed gives the same candidates, another seed others; candidates of
    one prompt differ from each other."""
    from pangu_draw_ms.prompting.enhancer import PromptEnhancer

    enhancer = PromptEnhancer.from_dir(hf_llama[1])
    settings = DecodingConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, num_candidates=3, seed=7)
    first = enhancer.enhance(["a red circle", "一个蓝色的正方形"], settings)
    again = enhancer.enhance(["a red circle", "一个蓝色的正方形"], settings)
    other = enhancer.enhance(["a red circle", "一个蓝色的正方形"], DecodingConfig(
        max_new_tokens=8, temperature=1.5, top_p=0.95, num_candidates=3, seed=8))
    assert first == again
    assert first != other
    assert len(set(first[0])) > 1 and len(first) == 2 and all(len(c) == 3 for c in first)


def test_choose_token_greedy_and_nucleus():
    """Temperature 0 is the argmax; top-p keeps the smallest set of most probable tokens reaching p."""
    logits = np.log(np.array([0.2, 0.5, 0.3]))
    rng = np.random.default_rng(0)
    assert choose_token(logits, DecodingConfig(), rng) == 1
    nucleus = DecodingConfig(temperature=1.0, top_p=0.6, num_candidates=2)
    draws = [choose_token(logits, nucleus, rng) for _ in range(300)]
    assert set(draws) == {1, 2}  # 0.5 + 0.3 reaches 0.6; token 0 is outside the nucleus
    assert 0.5 < draws.count(1) / 300 < 0.75  # renormalised: 0.625
    with pytest.raises(ValueError, match="needs temperature > 0"):
        DecodingConfig(num_candidates=2)


def _sft_config(tmp_path, pairs, steps, **extra):
    from pangu_draw_ms.prompting.config import PromptTrainConfig
    from pangu_draw_ms.training.config import DataConfig, OptimConfig, TrainConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    enhancer = tmp_path / "tiny_enhancer.yaml"
    enhancer.write_text(f"vocab_size: 200\nhidden_size: 32\nnum_layers: 1\nnum_heads: 2\nnum_kv_heads: 1\n"
                        f"intermediate_size: 64\nmax_length: 32\ntokenizer:\n  kind: sentencepiece\n"
                        f"  vocab: {os.path.join(pairs, 'tokenizer.model')}\n  jieba: true\n")

    return TrainConfig(model="tiny", stage="prompt_sft", output_dir=str(tmp_path / "run"), steps=steps, seed=0,
                       prompt=PromptTrainConfig(enhancer=str(enhancer)),
                       data=DataConfig(manifest=os.path.join(pairs, "train.jsonl"), batch_size=16, uncond_prob=0.0),
                       optim=OptimConfig(learning_rate=1e-2, ema_decay=0.0), **extra)


def test_sft_loss_decreases_and_resume_is_exact(tmp_path, pairs):
    """Stage prompt_sft on 400 pairs: the loss falls; 3 + resume + 3 steps give the weights of 6 steps."""
    from pangu_draw_ms.training.metrics import METRICS_FILE
    from pangu_draw_ms.training.trainer import Trainer

    trainer = Trainer(_sft_config(tmp_path / "a", pairs, 24, export_dir=str(tmp_path / "exported")))
    summary = trainer.train()
    with open(tmp_path / "a" / "run" / METRICS_FILE, encoding="utf-8") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert os.path.isfile(summary["export"]["weights"])

    straight = Trainer(_sft_config(tmp_path / "b", pairs, 6))
    straight.train()
    first = Trainer(_sft_config(tmp_path / "c", pairs, 6))
    first.train(steps=3)
    first.save()
    resumed = Trainer(_sft_config(tmp_path / "c", pairs, 6))
    assert resumed.resume()
    resumed.train()
    assert resumed.digest() == straight.digest()


def test_mismatched_tokenizer_or_weights_are_refused(tmp_path, pairs, hf_llama):
    """A tokenizer whose size is not the LM's vocabulary, or weights of another shape, give a clear error."""
    from pangu_draw_ms.io.checkpoint import load_tensors, save_checkpoint
    from pangu_draw_ms.prompting.enhancer import PromptEnhancer
    from pangu_draw_ms.tokenizers import train

    config = load_enhancer_config(os.path.join(hf_llama[1], "config.yaml"))
    with open(os.path.join(pairs, "train.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["enriched"] for line in f]
    small = train(texts, str(tmp_path / "small"), 100, jieba=True, model_type="bpe")
    wrong_tokenizer = config.__class__(**{**config.__dict__, "tokenizer": config.tokenizer.__class__(
        kind="sentencepiece", vocab=small, jieba=True)})
    with pytest.raises(ValueError, match="has 100 pieces but its LM has vocab_size 200"):
        PromptEnhancer(wrong_tokenizer)
    state = load_tensors(os.path.join(hf_llama[1], "enhancer.safetensors"))
    state["model.tok_embeddings.embedding_weight"] = state["model.tok_embeddings.embedding_weight"][:100]
    save_checkpoint(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="embedding_weight"):
        PromptEnhancer(config, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="not an enhancer directory"):
        PromptEnhancer.from_dir(str(tmp_path))


def test_demo_pairs_hold_out_colour_shapes(pairs):
    """No training pair rewrites a held-out colour-shape pair; every enriched prompt keeps its short prompt's
    colour and shape words."""
    from pangu_draw_ms.prompting.data import read_pairs
    from pangu_draw_ms.prompting.demo_pairs import heldout_color_shapes

    rows = read_pairs(os.path.join(pairs, "train.jsonl"))
    held = set(heldout_color_shapes())
    assert len(held) == 6 and not any((r["color"], r["shape"]) in held for r in rows)
    assert {r["lang"] for r in rows} == {"en", "zh"}
    english = [r for r in rows if r["lang"] == "en"]
    assert all(r["color"] in r["enriched"] and r["shape"] in r["enriched"] for r in english)
    with open(os.path.join(pairs, "heldout.jsonl"), encoding="utf-8") as f:
        assert len(f.readlines()) == 12


def test_infer_enhance_prompt_on_the_demo_model(tmp_path, capsys):
    """``tools/infer.py --enhance-prompt`` with the demo model and its shipped enhancer: the rewrite is printed,
    drawn, and both prompts are in the PNG metadata; the rewrite keeps the short prompt's colour and shape."""
    from PIL import Image

    from pangu_draw_ms.cli import infer

    paths = infer.main(["--prompt", "a purple circle", "--enhance-prompt", "--steps", "2", "--seed", "1",
                        "--out", str(tmp_path), "--quiet", "--mode", "pynative", "--compile-cache", "off"])
    err = capsys.readouterr().err
    assert "enhanced prompt: a purple circle -> " in err
    with Image.open(paths[0]) as image:
        assert image.text["original_prompt"] == "a purple circle"
        rewrite = image.text["prompt"]
    assert rewrite != "a purple circle" and "purple circle" in rewrite
    assert json.loads(Image.open(paths[0]).text["parameters"])["original_prompt"] == "a purple circle"


@pytest.mark.parametrize("argv, message", [
    (["--enhance-candidates", "2"], "apply with --enhance-prompt"),
    (["--enhance-prompt", "--enhance-candidates", "0"], "--enhance-candidates must be >= 1"),
    (["--enhance-prompt", "--config", "tiny"], "give --enhancer-dir"),
])
def test_infer_enhancer_flags_are_checked_first(tmp_path, argv, message):
    from pangu_draw_ms.cli import infer

    with pytest.raises(SystemExit, match=message):
        infer.main(["--prompt", "a red circle", "--out", str(tmp_path), "--quiet"] + argv)


def test_raft_keeps_the_highest_reward_candidate(hf_llama, tmp_path):
    """With a fake reward (the expansion's length in characters, ties to the first) RAFT's kept pair of each
    prompt is exactly its longest candidate; two shards of the prompts give one whole call's candidates."""
    from pangu_draw_ms.prompting import raft
    from pangu_draw_ms.prompting.config import PromptTrainConfig
    from pangu_draw_ms.prompting.enhancer import PromptEnhancer

    enhancer = PromptEnhancer.from_dir(hf_llama[1])
    settings = PromptTrainConfig(candidates=3, temperature=1.5, top_p=0.95)
    prompts = [{"short": s, "lang": "en"} for s in ("a red circle", "a blue square", "a green cross", "a cross")]
    calls = []

    def fake_reward(shorts, expansions, indices):
        calls.append(list(indices))
        return np.array([len(e) for e in expansions], np.float64)

    candidates, rewards = raft.score_candidates(enhancer, prompts, 0, settings, seed=3, reward=fake_reward)
    kept = raft.best_pairs(prompts, candidates, rewards)
    for row, options, pair in zip(prompts, candidates, kept):
        lengths = [len(c or row["short"]) for c in options]
        assert pair["enriched"] == (options[int(np.argmax(lengths))] or row["short"]) and pair["reward"] == max(lengths)
        assert pair["short"] == row["short"] and pair["candidates"] == options
    assert calls[0] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # the K images of a prompt share its noise
    first, _ = raft.score_candidates(enhancer, prompts[:1], 0, settings, seed=3, reward=fake_reward)
    rest, _ = raft.score_candidates(enhancer, prompts[1:], 1, settings, seed=3, reward=fake_reward)
    assert first + rest == candidates
    assert raft.round_prompts(prompts, 2, seed=0, round_index=1) == raft.round_prompts(prompts, 2, 0, 1)


def test_prompt_raft_stage_runs_rounds_on_the_kept_pairs(tmp_path, pairs, monkeypatch):
    """Stage prompt_raft (2 rounds, a fake reward standing in for drawing): each round writes its scored
    candidates and trains on the kept pairs; a resumed run reads the rounds' files instead of generating again."""
    from pangu_draw_ms.prompting.config import PromptTrainConfig
    from pangu_draw_ms.prompting.raft import read_jsonl
    from pangu_draw_ms.training.stages import PromptRAFTStage
    from pangu_draw_ms.training.trainer import Trainer

    drawn = []

    def fake_reward(shorts, expansions, indices):
        drawn.extend(expansions)
        return np.array([-len(e) for e in expansions], np.float64)

    monkeypatch.setattr(PromptRAFTStage, "_reward", lambda self: fake_reward)
    sft = _sft_config(tmp_path, pairs, 4)
    prompt = PromptTrainConfig(enhancer=sft.prompt.enhancer, rounds=2, prompts_per_round=8, candidates=2,
                               max_new_tokens=6)  # an untrained LM rarely stops: keep its pairs within the context
    config = sft.__class__(**{**sft.__dict__, "stage": "prompt_raft", "prompt": prompt,
                              "data": sft.data.__class__(**{**sft.data.__dict__, "batch_size": 4})})
    trainer = Trainer(config)
    summary = trainer.train()
    assert summary["steps"] == 4 and len(drawn) == 2 * 8 * 2
    for round_index in (0, 1):
        rows = read_jsonl(os.path.join(config.output_dir, "raft", f"round_{round_index}.jsonl"))
        assert len(rows) == 8
        assert all(r["enriched"] == min(r["candidates"], key=lambda c: len(c or r["short"])) or
                   r["reward"] == max(r["rewards"]) for r in rows)
    resumed = Trainer(config)
    assert resumed.resume() and len(drawn) == 32
