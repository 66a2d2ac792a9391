"""The demo: a synthetic bilingual coloured-shapes world (:mod:`.shapes`), a judge of prompt following
(:mod:`.judge`), and - in this folder - the model trained on it with our tools (``config.yaml``, one
safetensors file per component, the SentencePiece tokenizer), the default model of ``tools/infer.py``, and
the demo LoRA (``lora_star/``, training stage ``lora``) that teaches it to draw stars."""
import os

DEMO_MODEL_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_STAR_LORA_DIR = os.path.join(DEMO_MODEL_DIR, "lora_star")
