"""Typed configuration of the prompt enhancer: its causal LM and tokenizer, and how it decodes.

The paper's supplement rewrites a user's short prompt with an LLM fine-tuned on (succinct -> enriched)
prompt pairs, then refined with RAFT (reward-ranked fine-tuning, Dong et al. 2023, arXiv 2304.06767). The
LLM here is mindformers' LLaMA (:mod:`pangu_draw_ms.prompting.llama`); :class:`EnhancerConfig` is its
architecture in transformers' ``LlamaConfig`` terms plus the SentencePiece tokenizer it reads, and
:class:`DecodingConfig` the sampling settings of :func:`pangu_draw_ms.prompting.decoding.generate`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..config import TokenizerConfig, _check, from_dict, read_yaml, resolve_config_path

#: An enhancer directory holds these three files (``tools/train.py`` stage ``prompt_sft`` writes them).
ENHANCER_CONFIG = "config.yaml"
ENHANCER_WEIGHTS = "enhancer.safetensors"
ENHANCER_TOKENIZER = "tokenizer.model"


@dataclass(frozen=True)
class EnhancerConfig:
    """A LLaMA causal LM (RMSNorm, rotary positions, SwiGLU, grouped-query attention) and its tokenizer.

    ``max_length``: the context window in tokens, prompt and continuation together (mindformers'
    ``seq_length``: the decoding loop runs the model on rows of exactly this length). ``num_kv_heads``: key/value
    heads (grouped-query attention; ``num_heads`` divisible by it). ``tokenizer``: a SentencePiece model
    (``kind: sentencepiece``) whose ids are the LM's vocabulary: its size must equal ``vocab_size``; a relative
    ``vocab`` path is resolved beside the YAML file.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_length: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(
        kind="sentencepiece", vocab=ENHANCER_TOKENIZER, jieba=True))

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(getattr(self, name) >= 1, f"enhancer.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 2 == 0,
               f"enhancer.hidden_size {self.hidden_size} must be num_heads ({self.num_heads}) x an even head width "
               "(rotary embeddings rotate pairs of channels)")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"enhancer.num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.max_length >= 4, f"enhancer.max_length must be >= 4 tokens, got {self.max_length}")
        _check(self.rms_norm_eps > 0 and self.rope_theta > 0, "enhancer.rms_norm_eps and rope_theta must be > 0")
        _check(self.tokenizer.kind == "sentencepiece", f"enhancer.tokenizer.kind must be 'sentencepiece' (the LM's "
               f"ids are a SentencePiece model's pieces), got {self.tokenizer.kind!r}")


@dataclass(frozen=True)
class DecodingConfig:
    """Sampling settings. ``temperature`` 0 is greedy decoding (argmax); above 0 the next token is sampled
    from softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches
    ``top_p`` (nucleus sampling; 1 = no restriction). Decoding stops at the end token or after
    ``max_new_tokens``. ``num_candidates`` continuations per prompt; candidate j of prompt i draws from
    ``numpy.random.default_rng([seed, i, j])``, so a result does not depend on how prompts are batched."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    num_candidates: int = 1
    seed: int = 0

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, f"decoding.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"decoding.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0 < self.top_p <= 1, f"decoding.top_p must be in (0, 1], got {self.top_p}")
        _check(self.num_candidates >= 1, f"decoding.num_candidates must be >= 1, got {self.num_candidates}")
        _check(self.num_candidates == 1 or self.temperature > 0,
               f"decoding.num_candidates {self.num_candidates} needs temperature > 0: greedy decoding gives one "
               "continuation per prompt")


def load_enhancer_config(path: str, folder: Optional[str] = None) -> EnhancerConfig:
    """An :class:`EnhancerConfig` from a YAML file (or a bundled config name), its tokenizer vocab resolved
    relative to ``folder`` (default: the YAML's folder)."""
    path = resolve_config_path(path)
    data = read_yaml(path) or {}
    _check(isinstance(data, dict), f"{path}: an enhancer config is a mapping (vocab_size, hidden_size, ...)")
    folder = folder or os.path.dirname(os.path.abspath(path))
    tokenizer = dict(data.get("tokenizer") or {"kind": "sentencepiece", "vocab": ENHANCER_TOKENIZER, "jieba": True})
    vocab = tokenizer.get("vocab", "")
    if vocab and not os.path.isabs(vocab):
        tokenizer["vocab"] = os.path.join(folder, vocab)
    return from_dict(EnhancerConfig, {**data, "tokenizer": tokenizer}, where=os.path.basename(path))


def enhancer_config_from_transformers(config: dict, tokenizer: str, max_length: Optional[int] = None,
                                      jieba: bool = True) -> EnhancerConfig:
    """The :class:`EnhancerConfig` of a transformers ``LlamaConfig`` (config.json as a dict) read with the
    SentencePiece model ``tokenizer``; ``max_length`` defaults to ``max_position_embeddings``."""
    unsupported = {key: config[key] for key in ("rope_scaling", "attention_bias", "mlp_bias")
                   if config.get(key) not in (None, False)}
    _check(not unsupported, f"transformers LLaMA options {unsupported} are not supported by the enhancer's LM")
    _check(config.get("hidden_act", "silu") == "silu",
           f"hidden_act {config.get('hidden_act')!r}: LLaMA's SwiGLU uses 'silu'")
    heads = config["num_attention_heads"]
    return EnhancerConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"],
        max_length=max_length or config.get("max_position_embeddings", 2048),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 10000.0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        tokenizer=TokenizerConfig(kind="sentencepiece", vocab=tokenizer, jieba=jieba))


@dataclass(frozen=True)
class PromptTrainConfig:
    """The enhancer training stages (``tools/train.py``, stages ``prompt_sft`` and ``prompt_raft``).

    ``enhancer``: an enhancer directory to fine-tune (its weights are the start: the SFT enhancer for RAFT), or
    the architecture YAML (or bundled name, e.g. ``prompting/demo_enhancer``) of a new, randomly initialised one.
    The training pairs are ``data.manifest`` (JSONL rows ``short``, ``enriched``, ``lang``), filtered by
    ``data.languages``; ``data.batch_size`` pairs per worker and micro-step.

    Stage ``prompt_raft`` (RAFT, Dong et al. 2023, arXiv 2304.06767) runs ``rounds`` rounds of ``steps / rounds``
    optimizer steps. Before each, ``prompts_per_round`` distinct short prompts of the manifest (a seeded draw per
    round) are expanded ``candidates`` times each (``temperature``, ``top_p``, at most ``max_new_tokens``); each
    expansion is drawn by the image model (``model``, ``sampling_steps``, ``guidance_scale``; the candidates of one
    prompt share their initial noise) and scored ``aesthetic_weight`` x aesthetic score (the scorer folder
    ``aesthetic``, default the demo scorer) + ``clip_weight`` x CLIP-score of the image against the SHORT prompt
    (the demo CLIP folder ``clip``, default the shipped one); the round fine-tunes on each prompt's best expansion."""

    enhancer: str = "prompting/demo_enhancer"
    rounds: int = 2
    prompts_per_round: int = 64
    candidates: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 24
    aesthetic_weight: float = 1.0
    clip_weight: float = 0.1
    aesthetic: str = ""
    clip: str = ""
    sampling_steps: int = 20
    guidance_scale: float = 5.0

    def __post_init__(self):
        _check(bool(self.enhancer), "prompt.enhancer must name an enhancer directory or an architecture YAML")
        _check(self.rounds >= 1 and self.prompts_per_round >= 1,
               f"prompt.rounds and prompt.prompts_per_round must be >= 1, got {self.rounds}, {self.prompts_per_round}")
        _check(self.candidates >= 2, f"prompt.candidates must be >= 2 (RAFT ranks several expansions of a prompt), "
               f"got {self.candidates}")
        DecodingConfig(temperature=self.temperature, top_p=self.top_p, num_candidates=self.candidates,
                       max_new_tokens=self.max_new_tokens)
        _check(self.aesthetic_weight >= 0 and self.clip_weight >= 0 and self.aesthetic_weight + self.clip_weight > 0,
               "prompt.aesthetic_weight and prompt.clip_weight must be >= 0, not both 0")
        _check(self.sampling_steps >= 1 and self.guidance_scale >= 0,
               "prompt.sampling_steps must be >= 1 and prompt.guidance_scale >= 0")

    def decoding(self, seed: int) -> DecodingConfig:
        """How RAFT samples its candidate expansions."""
        return DecodingConfig(temperature=self.temperature, top_p=self.top_p, num_candidates=self.candidates,
                              max_new_tokens=self.max_new_tokens, seed=seed)
