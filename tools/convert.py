"""Convert checkpoints into pangu_draw_ms files (our parameter names, one component per file).

Released PanGu-Draw 3.0 pair -> structure_unet, texture_unet, vae, conditioner + the config YAML:

    python tools/convert.py released --structure pangu_high_timestamp-c6344411.ckpt \\
        --texture pangu_low_timestamp-127da122.ckpt --out weights/ --dtype fp16

diffusers / transformers weights -> our layout (a pipeline folder converts unet/, vae/, text_encoder/,
text_encoder_2/ and controlnet/; a model folder or a single file converts one component, whose
architecture comes from the config.json beside it or from --config, a YAML of the component's config):

    python tools/convert.py diffusers stable-diffusion-xl-base-1.0/ --out sdxl/
    python tools/convert.py diffusers controlnet-canny/diffusion_pytorch_model.safetensors --out cn/
    python tools/convert.py diffusers open_clip_model.safetensors --component text_encoder \\
        --config bigg_text.yaml --out text/

Every output is written atomically (an existing file survives a failed run) and the run ends with a
summary: tensors, parameters, bytes, and the entries left out.
"""
# The command lives in pangu_draw_ms.cli.convert (installed as `pangu-draw-convert`); this file keeps
# `python tools/convert.py` working from a checkout without installing the package.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pangu_draw_ms.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
