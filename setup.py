"""pangu_draw_ms: PanGu-Draw (bilingual 5B text-to-image latent diffusion) in MindSpore."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MINDFORMERS = "mindformers==1.9.0"  # MindSpore's LLM library (built for mindspore 2.9)


def read_requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="pangu_draw_ms",
    version="0.1.0",
    description="PanGu-Draw text-to-image diffusion (time-decoupled training, Coop-Diffusion) in MindSpore",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["pangu_draw_ms", "pangu_draw_ms.*"]) + ["pangu_draw_ms.configs"],
    # configs/ lives at the top of the repository and is installed as pangu_draw_ms/configs.
    package_dir={"pangu_draw_ms.configs": "configs"},
    package_data={
        "pangu_draw_ms.configs": ["*.yaml", "*/*.yaml"],
        "pangu_draw_ms.tokenizers": ["data/*"],
        # The CPU kernels' C++ source, compiled on first use (models/cpu_kernels.py).
        "pangu_draw_ms.models": ["kernels/*.cc"],
        # The demo model trained with tools/train.py: the default of tools/infer.py; clip/ is its evaluator;
        # lora_star/ the demo LoRA (stage lora) that teaches it stars.
        "pangu_draw_ms.demo": ["config.yaml", "*.safetensors", "*.model", "*.png", "clip/*", "enhancer/*",
                               "aesthetic/*", "lora_star/*"],
    },
    install_requires=read_requirements(),
    entry_points={"console_scripts": [
        f"pangu-draw-{name.replace('_', '-')}=pangu_draw_ms.cli.{name}:main"
        for name in ("infer", "evaluate", "train", "convert", "eval_demo", "eval_controlnet", "make_demo_data",
                     "train_tokenizer", "ablate", "export", "make_prompt_pairs",
                     "train_demo_aesthetic", "eval_enhancer")
    ]},
    extras_require={
        # torch 2.13.0 is the CPU wheel on the machine's local disk; never let pip pull another torch.
        # The metrics' reference implementations: pytorch-fid (its Inception needs torchvision), torchmetrics,
        # and cn_clip, which the README's test command installs without its training dependencies; peft for the
        # LoRA parity test (diffusers' adapters).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "torchvision==0.28.0", "diffusers", "transformers==4.57.1",
                 "pytorch-fid==0.3.0", "torchmetrics==1.9.0", "six", "ruff==0.17.6", "peft==0.21.2", MINDFORMERS],
        # The prompt enhancer (--enhance-prompt, stages prompt_sft/prompt_raft): mindformers' LLaMA.
        "prompt": [MINDFORMERS],
    },
)
