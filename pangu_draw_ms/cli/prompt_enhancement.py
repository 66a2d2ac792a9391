"""``--enhance-prompt`` for the drawing commands: short prompts rewritten by a prompt enhancer before drawing.

The enhancer (:class:`pangu_draw_ms.prompting.enhancer.PromptEnhancer`) is ``--enhancer-dir`` or, with the
embedded demo model, the demo enhancer shipped beside it. One candidate (the default) is the greedy rewrite;
``--enhance-candidates K`` draws K rewrites per prompt (temperature 1, top-p 0.9, seeded by ``--seed``), each
drawn ``--num-images`` times. Each rewrite is printed on stderr as ``enhanced prompt: SHORT -> REWRITE``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

#: Sampling settings of --enhance-candidates K > 1 (nucleus sampling, Holtzman et al. 2020).
CANDIDATE_TEMPERATURE = 1.0
CANDIDATE_TOP_P = 0.9


def add_enhancer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt enhancement (the paper supplement's LLM rewriter)")
    group.add_argument("--enhance-prompt", action="store_true",
                       help="rewrite each prompt with the prompt enhancer before drawing (both prompts are stored "
                            "in the PNG metadata: prompt, original_prompt)")
    group.add_argument("--enhancer-dir", help="an enhancer directory (config.yaml, enhancer.safetensors, "
                                              "tokenizer.model; default: the demo enhancer, with the demo model)")
    group.add_argument("--enhance-candidates", type=int, default=1, metavar="K",
                       help="rewrites per prompt: 1 = the greedy rewrite, K > 1 = K sampled rewrites, each drawn")


def check_enhancer_arguments(args, uses_demo_model: bool) -> None:
    """Refuse enhancer flags that cannot work, before any model is loaded (one ``error:`` line, exit 2)."""
    if not args.enhance_prompt:
        if args.enhancer_dir or args.enhance_candidates != 1:
            raise SystemExit("error: --enhancer-dir and --enhance-candidates apply with --enhance-prompt")
        return
    if args.enhance_candidates < 1:
        raise SystemExit(f"error: --enhance-candidates must be >= 1, got {args.enhance_candidates}")
    if not args.enhancer_dir and not uses_demo_model:
        raise SystemExit("error: --enhance-prompt: give --enhancer-dir (the demo enhancer goes with the demo model "
                         "only: it writes the demo world's prompts)")


def enhance_prompts(args, prompts: List[str]) -> Tuple[List[str], List[str]]:
    """``(prompts to draw, the prompt each came from)``: the rewrites of ``--enhance-prompt`` (K per prompt,
    consecutive), or ``prompts`` themselves."""
    if not args.enhance_prompt:
        return list(prompts), list(prompts)
    from pangu_draw_ms.prompting.config import DecodingConfig
    from pangu_draw_ms.prompting.enhancer import DEMO_ENHANCER_DIR, PromptEnhancer

    k = args.enhance_candidates
    sampled = k > 1
    decoding = DecodingConfig(num_candidates=k, seed=args.seed, temperature=CANDIDATE_TEMPERATURE if sampled else 0.0,
                              top_p=CANDIDATE_TOP_P if sampled else 1.0)
    enhancer = PromptEnhancer.from_dir(args.enhancer_dir or DEMO_ENHANCER_DIR)
    rewrites = enhancer.enhance(prompts, decoding)
    enhanced, originals = [], []
    for prompt, candidates in zip(prompts, rewrites):
        for candidate in candidates:
            print(f"enhanced prompt: {prompt} -> {candidate}", file=sys.stderr, flush=True)
            enhanced.append(candidate or prompt)  # an empty rewrite draws the prompt itself
            originals.append(prompt)
    return enhanced, originals
