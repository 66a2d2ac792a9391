"""CLIP text encoder and conditioner: parity with transformers CLIP (identical seeded weights, fp32)."""
import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import Timesteps
from mindspore.nn.utils import no_init_parameters
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pangu_draw_ms.config import ConditionerConfig, ConfigError, TextEncoderConfig
from pangu_draw_ms.io.state import StateDictError, load_state
from pangu_draw_ms.io.transformers_clip import clip_text_from_open_clip, clip_text_from_transformers
from pangu_draw_ms.models.clip_text import CLIPTextEncoder
from pangu_draw_ms.models.conditioner import Conditioner
from pangu_draw_ms.models.layers import count_parameters

from helpers import assert_close, randomize_torch_module, torch_state_numpy

VOCAB = 1000
LENGTH = 77
# CLIP BPE layout: start and end-of-text are the two largest ids (pooling takes the argmax id).
BPE_START, BPE_END = VOCAB - 2, VOCAB - 1
# BERT WordPiece layout: [CLS] 101, [SEP] 102, with larger ids for ordinary tokens.
WORDPIECE_START, WORDPIECE_END = 101, 102


def prompt_ids(start_id, end_id, content_ids, end_positions, pad_ids, seed=0):
    """(B, LENGTH) int32 ids: start, random content, end token at ``end_positions[b]``, then padding."""
    rng = np.random.default_rng(seed)
    rows = []
    for end, pad in zip(end_positions, pad_ids):
        row = np.full(LENGTH, pad, dtype=np.int32)
        row[0] = start_id
        row[1:end] = rng.integers(*content_ids, size=end - 1)
        row[end] = end_id
        rows.append(row)
    return np.stack(rows)


# End token early / mid / last; row 1 pads with the end token itself (OpenAI CLIP style) so a second
# occurrence follows the first, and only the FIRST one may be pooled.
BPE_IDS = prompt_ids(BPE_START, BPE_END, (1, BPE_START), (5, 40, LENGTH - 1), (0, BPE_END, 0))
WORDPIECE_IDS = prompt_ids(WORDPIECE_START, WORDPIECE_END, (WORDPIECE_END + 1, VOCAB), (7, 30, LENGTH - 1),
                           (0, WORDPIECE_END, 0), seed=1)


def tiny_config(hidden_act="quick_gelu", output_layer="last", projection_dim=None, eot_token_id=None,
                hidden_size=32, num_layers=3):
    return TextEncoderConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                             intermediate_size=2 * hidden_size, max_position_embeddings=LENGTH,
                             hidden_act=hidden_act, output_layer=output_layer, projection_dim=projection_dim,
                             eot_token_id=eot_token_id)


def reference_for(config: TextEncoderConfig, seed=0):
    """The transformers model of ``config`` with re-randomised weights.

    transformers pools at argmax(ids) only for the legacy ``eos_token_id == 2``, else at the first
    position equal to ``eos_token_id``: pick the one that matches our ``eot_token_id``.
    """
    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, projection_dim=config.projection_dim or 1,
        eos_token_id=2 if config.eot_token_id is None else config.eot_token_id)
    torch.manual_seed(seed)
    model_class = CLIPTextModel if config.projection_dim is None else CLIPTextModelWithProjection
    model = model_class(hf_config).eval()
    randomize_torch_module(model, seed=seed)
    return model


def ours_from(reference, config: TextEncoderConfig) -> CLIPTextEncoder:
    cell = CLIPTextEncoder(config)
    load_state(cell, clip_text_from_transformers(torch_state_numpy(reference)), what="transformers CLIP")
    return cell


def reference_outputs(reference, ids, config: TextEncoderConfig):
    """(hidden, pooled) of the transformers model, with our output_layer semantics; pooled is
    ``text_embeds`` with a projection, else ``pooler_output``."""
    with torch.no_grad():
        out = reference(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    hidden = out.last_hidden_state if config.output_layer == "last" else out.hidden_states[-2]
    pooled = out.text_embeds if config.projection_dim is not None else out.pooler_output
    return hidden.numpy(), pooled.numpy()


@pytest.mark.parametrize("output_layer", ["last", "penultimate"])
def test_hidden_matches_transformers(ms_mode, output_layer):
    config = tiny_config(hidden_act="quick_gelu", output_layer=output_layer)
    reference = reference_for(config)
    hidden, pooled = ours_from(reference, config)(ms.Tensor(BPE_IDS))
    ref_hidden, ref_pooled = reference_outputs(reference, BPE_IDS, config)
    assert_close(hidden.asnumpy(), ref_hidden, what=f"{output_layer} hidden ({ms_mode})")
    assert_close(pooled.asnumpy(), ref_pooled, what=f"unprojected pooled ({ms_mode})")


@pytest.mark.parametrize("eot_token_id, ids", [(None, BPE_IDS), (WORDPIECE_END, WORDPIECE_IDS)],
                         ids=["argmax", "eot_id"])
def test_pooled_matches_transformers_with_projection(ms_mode, eot_token_id, ids):
    config = tiny_config(hidden_act="gelu", output_layer="penultimate", projection_dim=24, eot_token_id=eot_token_id)
    reference = reference_for(config, seed=1)
    hidden, pooled = ours_from(reference, config)(ms.Tensor(ids))
    ref_hidden, ref_pooled = reference_outputs(reference, ids, config)
    assert_close(hidden.asnumpy(), ref_hidden, what=f"penultimate hidden ({ms_mode})")
    assert_close(pooled.asnumpy(), ref_pooled, what=f"pooled, eot_token_id={eot_token_id} ({ms_mode})")


def test_eot_modes_pool_different_positions():
    """The two EOT modes disagree on the WordPiece ids (ordinary tokens exceed [SEP]), so the pooled
    parity test above distinguishes them; and the repeated end token of row 1 checks first-occurrence."""
    argmax = WORDPIECE_IDS.argmax(axis=1)
    first_sep = (WORDPIECE_IDS == WORDPIECE_END).argmax(axis=1)
    assert np.all(argmax != first_sep)
    assert (BPE_IDS[1] == BPE_END).sum() > 1 and (WORDPIECE_IDS[1] == WORDPIECE_END).sum() > 1


def open_clip_layout(hf_state, torch_suffixes=True):
    """An OpenCLIP text-tower state dict holding the same tensors as a transformers state dict."""
    norm = ("weight", "bias") if torch_suffixes else ("gamma", "beta")
    embedding = "weight" if torch_suffixes else "embedding_table"
    hf = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in hf_state.items()}
    out = {f"token_embedding.{embedding}": hf["embeddings.token_embedding.weight"],
           "positional_embedding": hf["embeddings.position_embedding.weight"],
           f"ln_final.{norm[0]}": hf["final_layer_norm.weight"], f"ln_final.{norm[1]}": hf["final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].T.copy(),
           "logit_scale": np.array(4.6052, np.float32)}
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")})
    for n in layers:
        ours, theirs = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{kind}"] = np.concatenate(
                [hf[ours + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], axis=0)
            out[theirs + f"attn.out_proj.{kind}"] = hf[ours + f"self_attn.out_proj.{kind}"]
            out[theirs + f"mlp.c_fc.{kind}"] = hf[ours + f"mlp.fc1.{kind}"]
            out[theirs + f"mlp.c_proj.{kind}"] = hf[ours + f"mlp.fc2.{kind}"]
        for theirs_ln, ours_ln in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            for torch_leaf, leaf in zip(("weight", "bias"), norm):
                out[theirs + f"{theirs_ln}.{leaf}"] = hf[ours + f"{ours_ln}.{torch_leaf}"]
    return out


@pytest.mark.parametrize("torch_suffixes", [True, False], ids=["torch_names", "mindspore_names"])
def test_open_clip_mapping_gives_the_same_cell(torch_suffixes):
    config = tiny_config(hidden_act="gelu", output_layer="penultimate", projection_dim=24)
    reference = reference_for(config, seed=2)
    hf_state = torch_state_numpy(reference)
    via_transformers = clip_text_from_transformers(hf_state)
    via_open_clip = clip_text_from_open_clip(open_clip_layout(hf_state, torch_suffixes))
    assert sorted(via_open_clip) == sorted(via_transformers)
    for name, value in via_transformers.items():
        np.testing.assert_array_equal(via_open_clip[name], value, err_msg=name)

    cell = CLIPTextEncoder(config)
    load_state(cell, via_open_clip, what="OpenCLIP")
    hidden, pooled = cell(ms.Tensor(BPE_IDS))
    ref_hidden, ref_pooled = reference_outputs(reference, BPE_IDS, config)
    assert_close(hidden.asnumpy(), ref_hidden, what="penultimate hidden via OpenCLIP names")
    assert_close(pooled.asnumpy(), ref_pooled, what="pooled via OpenCLIP names")


def test_transformers_mapping_accepts_mindspore_suffixes_and_drops_position_ids():
    hf_state = torch_state_numpy(reference_for(tiny_config(projection_dim=8), seed=3))
    hf_state["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
    mindspore_named = {k.replace("layer_norm1.weight", "layer_norm1.gamma").replace("final_layer_norm.bias",
                                                                                    "final_layer_norm.beta")
                       .replace("token_embedding.weight", "token_embedding.embedding_table"): v
                       for k, v in hf_state.items()}
    assert mindspore_named.keys() != hf_state.keys()
    expected = clip_text_from_transformers(hf_state)
    assert "embeddings.position_ids" not in expected
    assert sorted(clip_text_from_transformers(mindspore_named)) == sorted(expected)
    load_state(CLIPTextEncoder(tiny_config(projection_dim=8)), expected)  # strict: every name fits


def test_mappings_reject_foreign_keys():
    with pytest.raises(StateDictError, match="vision_model.post_layernorm.weight"):
        clip_text_from_transformers({"text_model.final_layer_norm.weight": np.ones(4),
                                     "vision_model.post_layernorm.weight": np.ones(4)})
    with pytest.raises(StateDictError, match="visual.proj"):
        clip_text_from_open_clip({"ln_final.weight": np.ones(4), "visual.proj": np.ones((4, 4))})
    with pytest.raises(StateDictError, match="3 x width"):
        clip_text_from_open_clip({"transformer.resblocks.0.attn.in_proj_weight": np.ones((8, 4))})


def test_conditioner_concatenates_features_and_appends_bucket_embedding(ms_mode):
    chinese = tiny_config(hidden_act="quick_gelu", output_layer="last", hidden_size=32, num_layers=2)
    english = tiny_config(hidden_act="gelu", output_layer="penultimate", projection_dim=40, hidden_size=48,
                          num_layers=3)
    config = ConditionerConfig(encoders=(chinese, english), pooled_from=1, bucket_embed_dim=256)
    references = (reference_for(chinese, seed=4), reference_for(english, seed=5))
    conditioner = Conditioner(config)
    load_state(conditioner, {f"encoders.{i}.{name}": value for i, reference in enumerate(references)
                             for name, value in clip_text_from_transformers(torch_state_numpy(reference)).items()})
    bucket_index = np.array([0, 5, 10], np.int32)

    crossattn, vector = conditioner((ms.Tensor(WORDPIECE_IDS), ms.Tensor(BPE_IDS)), ms.Tensor(bucket_index))

    chinese_hidden, _ = reference_outputs(references[0], WORDPIECE_IDS, chinese)
    english_hidden, english_pooled = reference_outputs(references[1], BPE_IDS, english)
    bucket = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(bucket_index)).numpy()
    assert crossattn.shape == (3, LENGTH, config.context_dim) and vector.shape == (3, config.vector_dim)
    assert_close(crossattn.asnumpy(), np.concatenate([chinese_hidden, english_hidden], axis=-1),
                 what=f"crossattn ({ms_mode})")
    assert_close(vector.asnumpy(), np.concatenate([english_pooled, bucket], axis=-1), what=f"vector ({ms_mode})")


def test_conditioner_rejects_wrong_number_of_id_tensors(ms_mode):
    encoder = tiny_config(projection_dim=8, num_layers=1)
    conditioner = Conditioner(ConditionerConfig(encoders=(encoder, encoder), pooled_from=0, bucket_embed_dim=8))
    with pytest.raises(ValueError, match="got 1 id tensors for 2 text encoders"):
        conditioner((ms.Tensor(BPE_IDS),), ms.Tensor(np.zeros(3, np.int32)))


def test_encoder_rejects_sequences_longer_than_its_positions(ms_mode):
    cell = CLIPTextEncoder(tiny_config(num_layers=1))
    with pytest.raises(ValueError, match="78 tokens exceed the 77 position embeddings"):
        cell(ms.Tensor(np.zeros((1, LENGTH + 1), np.int32)))


# The released PanGu-Draw 3.0 text encoders.
CHINESE = TextEncoderConfig(vocab_size=49408, hidden_size=768, num_layers=11, num_heads=12, intermediate_size=3072,
                            max_position_embeddings=77, hidden_act="quick_gelu", output_layer="last")
ENGLISH = TextEncoderConfig(vocab_size=49408, hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                            max_position_embeddings=77, hidden_act="gelu", output_layer="penultimate",
                            projection_dim=1280)


@pytest.mark.parametrize("config, expected", [(CHINESE, 115_972_608), (ENGLISH, 694_659_840)],
                         ids=["chinese", "english"])
def test_released_encoders_have_the_released_parameter_counts(config, expected):
    with no_init_parameters():
        cell = CLIPTextEncoder(config)
    assert count_parameters(cell) == expected
    names = {p.name for p in cell.get_parameters()}
    assert ("text_projection.weight" in names) == (config.projection_dim is not None)
    assert f"encoder.layers.{config.num_layers - 1}.mlp.fc2.weight" in names
    assert not any("logit_scale" in n for n in names)


def test_config_rejects_bad_text_encoder_values():
    with pytest.raises(ConfigError, match="hidden_act 'relu' is not valid"):
        tiny_config(hidden_act="relu")
    with pytest.raises(ConfigError, match="eot_token_id 1000 is not an id"):
        tiny_config(eot_token_id=VOCAB)
    with pytest.raises(ConfigError, match="projection_dim 0 must be >= 1"):
        tiny_config(projection_dim=0)
