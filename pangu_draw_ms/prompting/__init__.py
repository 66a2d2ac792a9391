"""Prompt enhancement (PanGu-Draw supplement, Fig. 8 and Fig. 10): an LLM that rewrites a short prompt into the
enriched prompt the image model was trained on, fine-tuned on (short -> enriched) pairs and refined with RAFT.

``config`` (architecture, decoding and training settings), ``llama`` (mindformers' LLaMA in CPU-safe settings),
``decoding`` (our sampling loop), ``template`` (how a pair is laid out), ``enhancer`` (``PromptEnhancer``),
``data`` (pairs as training batches), ``demo_pairs`` (the demo world's pairs).
"""
