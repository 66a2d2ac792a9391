"""MindIR export: a PanGu-Draw pipeline as graph files plus a manifest a runtime without our Python code
can follow (MindSpore Lite, or ``mindspore.load`` + ``nn.GraphCell``).

One export fixes a bucket (image size), the number of prompts per call, the sampler (Euler: its steps are
affine, ``z_next = A z + B eps``, so the update is inside the step graph) and which guidance branches run;
the guidance weights, the timesteps and the step coefficients stay inputs. Files:

* ``conditioner.mindir``: (bucket index per text row, token ids of each text encoder) -> (context, vector)
  for the texts of one call: the prompts, the negative prompt, then each style's prefix + the prompts;
* ``step_structure.mindir``, ``step_texture.mindir``: one sampling step of each generator the run uses, as the pipeline
  compiles it (:class:`~pangu_draw_ms.diffusion.compiled.StepGraph`): every guidance branch in one batched
  UNet call, the guidance combination and the Euler update. Inputs: z, (alpha_bar, A, B), the branch
  weights, then the UNet's rows (timestep, context, vector) - branch after branch, B rows each;
* ``vae_decoder.mindir``: one latent -> one image in [-1, 1];
* ``manifest.json``: every graph's inputs and outputs (names, shapes, dtypes), the bucket, the texts' order
  and how the branches' rows are built from them, the tokenizers (their files are copied in), the schedule
  of the default number of steps with each step's expert and (alpha_bar, A, B), and the guidance weights of
  the default guidance scale. :class:`MindIRPipeline` is that recipe run with the graphs alone.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn

from ..config import TokenizerConfig, to_dict
from ..diffusion.compiled import StepGraph
from ..diffusion.guidance import STYLE_PREFIXES
from ..diffusion.schedule import CLEAN
from ..models import cpu_kernels
from ..runtime import eager
from ..tokenizers import build_tokenizer

MANIFEST = "manifest.json"


class ConditionerGraph(nn.Cell):
    """The conditioner with flat inputs (bucket indices, then one id tensor per text encoder)."""

    def __init__(self, conditioner: nn.Cell):
        super().__init__(auto_prefix=False)
        self.conditioner = conditioner

    def construct(self, buckets, *ids):
        return self.conditioner(ids, buckets)


class DecoderGraph(nn.Cell):
    """The VAE's latents -> image path (the scaling factor applied inside)."""

    def __init__(self, vae: nn.Cell):
        super().__init__(auto_prefix=False)
        self.vae = vae

    def construct(self, z):
        return self.vae.decode_latents(z)


def _describe(names: Sequence[str], tensors: Sequence[ms.Tensor]) -> List[dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).lower()} for n, t in zip(names, tensors)]


def _export(cell: nn.Cell, inputs: Sequence[ms.Tensor], path: str) -> List[ms.Tensor]:
    """Write ``cell`` as MindIR at ``path`` (``.mindir``) and return its outputs on ``inputs`` (for their shapes
    and dtypes: computed eagerly, since a GRAPH_MODE call would compile the cell a second time). The graph
    holds MindSpore's own kernels only (not the CPU kernels of this machine's cache)."""
    with cpu_kernels.portable(cell):
        ms.export(cell, *inputs, file_name=path[:-len(".mindir")], file_format="MINDIR")
    with eager():
        outputs = cell(*inputs)
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def export_pipeline(pipe, directory: str, num_prompts: int = 1, **settings) -> dict:
    """Export ``pipe`` (a :class:`~pangu_draw_ms.pipelines.pangu_draw.PanGuDrawPipeline`) into ``directory``
    for calls of ``num_prompts`` prompts, one image each; ``settings``: ``plan`` arguments that fix the
    bucket and the branches (``height``/``width`` or ``ratio``, ``guidance_scale``, ``style_scales``,
    ``num_inference_steps`` for the manifest's schedule, ``negative_prompt``). Returns the manifest."""
    if settings.get("sampler", "euler") != "euler":
        raise ValueError("the export takes the Euler update into its step graphs; sampler must be 'euler'")
    run = pipe.plan(["a prompt"] * num_prompts, **dict(settings, sampler="euler"))
    os.makedirs(directory, exist_ok=True)
    config = pipe.config
    batch = run.latent_shape[0]
    styles = list(run.style_scales)
    texts = ["prompt"] * num_prompts + ["negative_prompt"] + [f"style:{s}" for s in styles
                                                                for _ in range(num_prompts)]
    graphs: Dict[str, dict] = {}

    tokenizer_entries = []
    for k, encoder in enumerate(config.conditioner.encoders):
        tokenizer = dict(to_dict(encoder.tokenizer))
        if tokenizer.get("vocab") and os.path.isfile(tokenizer["vocab"]):
            name = f"tokenizer_{k}{os.path.splitext(tokenizer['vocab'])[1]}"
            shutil.copyfile(tokenizer["vocab"], os.path.join(directory, name))
            tokenizer["vocab"] = name
        tokenizer_entries.append(tokenizer)
    ids = [ms.Tensor(np.zeros((len(texts), e.tokenizer.max_length), np.int32)) for e in config.conditioner.encoders]
    buckets = ms.Tensor(np.full((len(texts),), run.bucket_index, np.int32))
    conditioner = ConditionerGraph(pipe.components.get("conditioner"))
    outputs = _export(conditioner, [buckets] + ids, os.path.join(directory, "conditioner.mindir"))
    graphs["conditioner"] = {"file": "conditioner.mindir",
                             "inputs": _describe(["buckets"] + [f"ids_{k}" for k in range(len(ids))], [buckets] + ids),
                             "outputs": _describe(["context", "vector"], outputs)}

    denoiser, model = pipe.denoiser(run)
    z = ms.Tensor(np.zeros(run.latent_shape, np.float32))
    scalars = ms.Tensor(np.zeros((3,), np.float32))
    t_struct = run.t_struct
    # Each step's expert as the pipeline's router picks it (its switch rule: "release" lags a step behind t_struct).
    experts = {int(t): name for t, name in model.plan(run.timesteps).items()}
    for expert in dict.fromkeys(experts[int(t)] for t in run.timesteps):
        cell, inputs = denoiser.graph(next(t for t in experts if experts[t] == expert))
        step = StepGraph(cell, [], [], [], [], len(inputs), [])
        outputs = _export(step, [z, scalars] + list(inputs), os.path.join(directory, f"step_{expert}.mindir"))
        graphs[f"step_{expert}"] = {
            "file": f"step_{expert}.mindir",
            "inputs": _describe(["z", "alpha_bar_a_b", "branch_weights", "timesteps", "context", "vector"],
                                [z, scalars] + list(inputs)),
            "outputs": _describe(["z_next"], outputs[:1])}
    pipe.release_unets(model)
    one = ms.Tensor(np.zeros((1,) + tuple(run.latent_shape[1:]), np.float32))
    outputs = _export(DecoderGraph(pipe.components.get("vae")), [one], os.path.join(directory, "vae_decoder.mindir"))
    graphs["vae_decoder"] = {"file": "vae_decoder.mindir", "inputs": _describe(["z"], [one]),
                             "outputs": _describe(["image"], outputs)}

    timesteps = [int(t) for t in run.timesteps]
    steps = []
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        a, b = run.sampler.linear_coefficients(t, t_next)
        steps.append({"t": t, "expert": experts[t],
                      "alpha_bar": float(pipe.schedule.alpha_bar(t)), "a": float(a), "b": float(b)})
    manifest = {
        "model": config.name, "format": "MINDIR", "mindspore": ms.__version__,
        "bucket": {"index": run.bucket_index, "height": run.height, "width": run.width},
        "prompts_per_call": num_prompts, "latent_shape": list(run.latent_shape),
        "texts": texts, "negative_prompt": run.negative_prompt,
        "style_prefixes": {s: STYLE_PREFIXES[s] for s in styles},
        # Branch rows, in the step graphs' order: "cond" the prompts' rows, "uncond" the negative prompt's row
        # repeated for every prompt, a style its prefixed prompts' rows.
        "branches": [{"name": name, "weight": float(weight)} for name, weight in run.guidance_weights.items()],
        "guidance_scale": run.guidance_scale, "t_struct": t_struct,
        "switch_rule": run.switch_rule, "experts": "each step names the generator whose step graph runs it",
        "initial_noise": "standard normal of latent_shape (the pipeline draws image k from numpy "
                         "default_rng([seed, k]))",
        "sampler": "euler", "steps": steps, "tokenizers": tokenizer_entries, "graphs": graphs,
        "images": f"{batch} per call, decoded one at a time; [-1, 1], channels first",
    }
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest


class MindIRPipeline:
    """Text-to-image from an exported folder with nothing but its graphs (``mindspore.load`` +
    ``nn.GraphCell``) and its manifest - the steps a non-Python runtime takes, in Python; our tokenizers
    read the copied tokenizer files."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.graphs = {name: nn.GraphCell(ms.load(os.path.join(directory, entry["file"])))
                       for name, entry in self.manifest["graphs"].items()}
        tokenizers = []
        for entry in self.manifest["tokenizers"]:
            entry = dict(entry)
            if entry.get("vocab"):
                entry["vocab"] = os.path.join(directory, entry["vocab"])
            tokenizers.append(build_tokenizer(TokenizerConfig(**entry)))
        self.tokenizers = tokenizers

    def conditioning(self, prompts: Sequence[str]):
        """(context, vector) of every branch row, branch after branch, as the step graphs take them."""
        m = self.manifest
        n = m["prompts_per_call"]
        if len(prompts) != n:
            raise ValueError(f"this export draws {n} prompt(s) per call, got {len(prompts)}")
        styles = list(m["style_prefixes"])
        texts = list(prompts) + [m["negative_prompt"]] + [m["style_prefixes"][s] + p for s in styles for p in prompts]
        buckets = ms.Tensor(np.full((len(texts),), m["bucket"]["index"], np.int32))
        ids = [ms.Tensor(np.asarray(tokenizer(texts), np.int32)) for tokenizer in self.tokenizers]
        context, vector = (x.asnumpy() for x in self.graphs["conditioner"](buckets, *ids))
        rows = {"cond": np.arange(n), "uncond": np.full(n, n)}
        rows.update({s: n + 1 + i * n + np.arange(n) for i, s in enumerate(styles)})
        order = np.concatenate([rows[b["name"]] for b in m["branches"]])
        return context[order], vector[order]

    def __call__(self, prompts: Sequence[str], noise: np.ndarray, branch_weights: Optional[Sequence[float]] = None
                 ) -> np.ndarray:
        """Images in [-1, 1] (B, 3, H, W) for ``prompts`` from initial ``noise`` of the manifest's latent shape;
        ``branch_weights``: the guidance branches' weights (default: the export's guidance scale)."""
        m = self.manifest
        if tuple(noise.shape) != tuple(m["latent_shape"]):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; this export needs {tuple(m['latent_shape'])}")
        context, vector = self.conditioning(prompts)
        weights = ms.Tensor(np.asarray(branch_weights if branch_weights is not None else
                                       [b["weight"] for b in m["branches"]], np.float32))
        context, vector = ms.Tensor(context), ms.Tensor(vector)
        z = ms.Tensor(np.ascontiguousarray(noise, np.float32))
        for step in m["steps"]:
            timesteps = ms.Tensor(np.full((context.shape[0],), float(step["t"]), np.float32))
            scalars = ms.Tensor(np.array([step["alpha_bar"], step["a"], step["b"]], np.float32))
            z = self.graphs[f"step_{step['expert']}"](z, scalars, weights, timesteps, context, vector)
            z = z[0] if isinstance(z, (tuple, list)) else z
        latents = z.asnumpy()
        return np.concatenate([self.graphs["vae_decoder"](ms.Tensor(latents[i:i + 1])).asnumpy()
                               for i in range(latents.shape[0])])
