"""OpenGVLab-layout checkpoint -> transformers-native InternVL, for the reference side of parity tests.

This goes the other way from batchvl.tools.tiny.write_opengvlab and is written independently of it, so
that the native loader's reading of the OpenGVLab layout is checked against transformers running the same
weights. InternLM2 becomes Llama (the same computation, with its grouped wqkv split back).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def opengvlab_to_hf(src: Path, dst: Path) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(set(index.values())):
        weights.update(load_file(src / file))
    llm, vis = cfg["llm_config"], cfg["vision_config"]
    is_internlm2 = llm["model_type"] == "internlm2"
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name.startswith("vision_model."):
            out.update(_vision(name.removeprefix("vision_model."), w, vis["hidden_size"]))
        elif name.startswith("mlp1."):
            idx, kind = name.removeprefix("mlp1.").split(".")
            part = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}[idx]
            out[f"model.multi_modal_projector.{part}.{kind}"] = w
        elif is_internlm2:
            out.update(_internlm2(name.removeprefix("language_model."), w, llm))
        else:
            rest = name.removeprefix("language_model.")
            lm_key = "model.language_model." + rest.removeprefix("model.")
            out["lm_head.weight" if rest == "lm_head.weight" else lm_key] = w
    text = dict(llm)
    text.pop("architectures", None)
    if is_internlm2:
        text = {k: llm[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                     "max_position_embeddings", "tie_word_embeddings", "eos_token_id")}
        text.update(model_type="llama", attention_bias=False,
                    rope_parameters={"rope_type": llm["rope_scaling"]["type"], "rope_theta": llm["rope_theta"],
                                     "factor": llm["rope_scaling"]["factor"]})
    config = {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "downsample_ratio": cfg["downsample_ratio"], "vision_feature_layer": cfg["select_layer"],
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "image_token_id": None, "image_seq_length": 16,
        # transformers 5 ties the LM head by this top-level key; a tied checkpoint has no lm_head weight
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        "text_config": text,
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": vis["hidden_size"],
            "num_hidden_layers": vis["num_hidden_layers"], "num_attention_heads": vis["num_attention_heads"],
            "intermediate_size": vis["intermediate_size"], "image_size": vis["image_size"],
            "patch_size": vis["patch_size"], "norm_type": vis["norm_type"], "layer_norm_eps": vis["layer_norm_eps"],
            "attention_bias": vis["qkv_bias"], "use_qk_norm": vis["qk_normalization"], "use_mean_pooling": True,
        },
    }
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "special_tokens_map.json"):
            shutil.copy(f, dst / f.name)
    from transformers import AutoTokenizer

    config["image_token_id"] = AutoTokenizer.from_pretrained(src).convert_tokens_to_ids("<IMG_CONTEXT>")
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _vision(name: str, w: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    p = "model.vision_tower."
    fixed = {"embeddings.class_embedding": "embeddings.cls_token",
             "embeddings.position_embedding": "embeddings.position_embeddings",
             "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
             "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias"}
    if name in fixed:
        return {p + fixed[name]: w}
    layer, sub = name.removeprefix("encoder.layers.").split(".", 1)
    q = f"{p}encoder.layer.{layer}."
    if sub.startswith("attn.qkv."):
        kind = sub.rsplit(".", 1)[1]
        a, b, c = w.split(hidden)
        return {q + f"attention.q_proj.{kind}": a, q + f"attention.k_proj.{kind}": b, q + f"attention.v_proj.{kind}": c}
    renames = [("ls1", "lambda_1"), ("ls2", "lambda_2"), ("attn.proj", "attention.projection_layer"),
               ("attn.q_norm", "attention.q_norm"), ("attn.k_norm", "attention.k_norm"),
               ("norm1", "layernorm_before"), ("norm2", "layernorm_after")]
    for a, b in renames:
        if sub == a or sub.startswith(a + "."):
            sub = b + sub[len(a):]
            break
    return {q + sub: w}


def _internlm2(name: str, w: torch.Tensor, llm: dict) -> dict[str, torch.Tensor]:
    p = "model.language_model."
    if name == "output.weight":
        return {"lm_head.weight": w}
    if name == "model.tok_embeddings.weight":
        return {p + "embed_tokens.weight": w}
    if name == "model.norm.weight":
        return {p + "norm.weight": w}
    layer, sub = name.removeprefix("model.layers.").split(".", 1)
    q = f"{p}layers.{layer}."
    if sub == "attention.wqkv.weight":
        heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
        d = llm["hidden_size"] // heads
        g = w.reshape(kv, heads // kv + 2, d, -1)
        return {q + "self_attn.q_proj.weight": g[:, :-2].reshape(heads * d, -1),
                q + "self_attn.k_proj.weight": g[:, -2].reshape(kv * d, -1),
                q + "self_attn.v_proj.weight": g[:, -1].reshape(kv * d, -1)}
    names = {"attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
    return {q + names[sub]: w}
