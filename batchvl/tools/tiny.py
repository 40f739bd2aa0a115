"""`batchvl make-tiny-model`: a small random InternVL checkpoint, written the way real ones are.

It holds real safetensors weights, a config, a generation config, a preprocessor config and a byte-level
BPE tokenizer with InternVL's special tokens and a chat template, so tests and the demo load it through
exactly the code path a real checkpoint takes. Everything is derived from the seed: the same seed gives
the same files. The weights are random, so the text it produces is noise.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

MARKER = "batchvl-tiny.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# InternVL 2.5/3's default system message, so the template path is the one real checkpoints take.
SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '" + SYSTEM_MESSAGE + "' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in turns %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>\\n' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the tokenizer's merges are learned from: enough words for the random model's output to look wordy.
_CORPUS = """
A photo of a cat sitting on a wooden table next to a window. The sky is blue and the clouds are white.
Two people walk along the beach at sunset; the water reflects orange and purple light. A red car parked
on a quiet street in the city. This image shows a bowl of fruit: apples, bananas, oranges and grapes.
Describe this image in detail. What is in the picture? The chart compares sales across four regions.
A scanned page of a book with printed text in two columns and a figure at the bottom. Mountains covered
with snow rise behind a green valley with a small river. A dog runs through the grass with a ball.
The first frame shows a kitchen; the second frame shows a person cooking dinner on the stove.
"""


LAYOUTS = ("hf", "opengvlab")
LLMS = ("qwen2", "qwen3", "internlm2", "llama", "vicuna", "phi3")
VISIONS = ("300m", "6b")
# 1: InternVL 1 (Chat-V1-1 / V1-2): no dynamic tiling (one 448 px tile, no thumbnail), pixel shuffle v1.
# 2: InternVL 1.5 and later: dynamic tiling with a thumbnail, pixel shuffle v2.
GENERATIONS = (1, 2)
# The conversation template OpenGVLab's configs name for each language model family.
# InternVL3.5's Qwen3 checkpoints keep InternVL 2.5/3's template (see tests/test_templates.py for the sources).
# vicuna: a Llama-2-shaped model with FastChat's vicuna_v1.1 template and </s> as its EOS.
OPENGVLAB_TEMPLATES = {"qwen2": "internvl2_5", "qwen3": "internvl2_5", "internlm2": "internlm2-chat",
                       "llama": "Hermes-2", "vicuna": "vicuna_v1.1", "phi3": "phi3-chat"}


def tiny_config(seed: int, layout: str = "hf", llm: str = "qwen2", vision: str = "300m", fp8: bool = False,
                generation: int = 2) -> dict:
    config = {"seed": seed, "version": 2, "vision": vision, "llm": llm, "layout": layout}
    config = {**config, "generation": generation} if generation != 2 else config
    return {**config, "fp8": True} if fp8 else config


def make_tiny_model(out_dir: Path, seed: int = 0, force: bool = False, layout: str = "hf", llm: str = "qwen2",
                    vision: str = "300m", fp8: bool = False, generation: int = 2) -> bool:
    """Write the tiny checkpoint into `out_dir`. Returns False when an identical one is already there.
    `fp8`: in compressed-tensors' FP8_DYNAMIC layout, as llm-compressor writes it (see `write_fp8_dynamic`).
    `generation` 1: an InternVL 1 checkpoint (see GENERATIONS), in OpenGVLab's layout with InternViT-6B's shape."""
    if layout not in LAYOUTS or llm not in LLMS or vision not in VISIONS or generation not in GENERATIONS:
        raise ValueError(f"layout/llm/vision/generation must be one of {LAYOUTS} / {LLMS} / {VISIONS} / {GENERATIONS}")
    if llm in ("internlm2", "vicuna") and layout != "opengvlab":
        raise ValueError(f"--llm {llm} exists only in the OpenGVLab layout (its template is a named InternVL "
                         "conversation template, not a tokenizer chat template)")
    if generation == 1 and (layout != "opengvlab" or vision != "6b"):
        raise ValueError("--generation 1 needs --layout opengvlab --vision 6b: InternVL 1 pairs InternViT-6B only, "
                         "and transformers' InternVL cannot express its pixel shuffle (ps_version v1)")
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    wanted = tiny_config(seed, layout, llm, vision, fp8, generation)
    if not force and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return False
    if out_dir.exists():
        if any(out_dir.iterdir()) and not marker.is_file() and not force:
            raise FileExistsError(f"{out_dir} exists, is not empty and is not a batchvl tiny model; use --force")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer()
    if llm == "vicuna":  # Llama-2's EOS, where vicuna_v1.1 ends each reply (appended: the merges stay the same)
        tokenizer.add_special_tokens({"eos_token": "</s>"})
    model = build_model(tokenizer, seed, llm, vision)
    if layout == "hf":
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2MB")
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    else:
        tokenizer.chat_template = None  # the config's named template is used instead, as for InternVL2 checkpoints
        tokenizer.save_pretrained(tmp)
        write_opengvlab(tmp, model, llm, generation)
    if fp8:
        write_fp8_dynamic(tmp)
    (tmp / MARKER).write_text(json.dumps(wanted))
    tmp.rename(out_dir)
    return True


# The language model's linear weights in either layout and every family: what llm-compressor's FP8_DYNAMIC
# recipe (targets Linear, ignore the LM head and the vision side) quantizes in an InternVL checkpoint.
_LM_LINEAR = re.compile(r"(^|\.)language_model\.(model\.)?layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|"
                        r"mlp\.(gate|up|down|gate_up)_proj|attention\.(wqkv|wo)|feed_forward\.w[123])\.weight$")
FP8_DYNAMIC_ARGS = {
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                          "group_size": None, "block_structure": None, "actorder": None, "observer": None,
                          "observer_kwargs": {}},
}


def write_fp8_dynamic(path: Path, scale_dtype: torch.dtype = torch.float32) -> None:
    """Rewrite the checkpoint in `path` in compressed-tensors' FP8_DYNAMIC layout, as llm-compressor saves it
    (batchvl.models.compressed cites the sources): each language-model linear weight becomes float8_e4m3fn
    [out, in] with a `weight_scale` [out, 1] (in `scale_dtype`: compressed-tensors keeps the dense weight's
    dtype), quantized per output channel; config.json gets the `quantization_config`, whose `ignore` names the
    other linear layers (the LM head, the vision tower, the projector) as llm-compressor lists them."""
    from safetensors.torch import load_file, save_file

    from batchvl.models.fp8 import quantize_weight

    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    ignore = []
    for file in files:
        tensors = load_file(path / file)
        out = {}
        for name, w in tensors.items():
            if _LM_LINEAR.search(name):
                q, scale = quantize_weight(w)
                out[name], out[name + "_scale"] = q, scale.to(scale_dtype)
                if index:
                    index["weight_map"][name + "_scale"] = file
            else:
                out[name] = w
                if name.endswith(".weight") and w.dim() == 2 and "embed" not in name:
                    ignore.append(name.removesuffix(".weight"))
        save_file(out, path / file, metadata={"format": "pt"})
    if index:
        index_file.write_text(json.dumps(index, indent=2))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], **FP8_DYNAMIC_ARGS, "output_activations": None,
                                      "format": "float-quantized"}},
        "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


PREPROCESSOR_CONFIG = {
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "crop_to_patches": True,
    "min_patches": 1,
    "max_patches": 12,
    "size": {"height": 448, "width": 448},
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def build_tokenizer():
    """A byte-level BPE tokenizer learned from a fixed text, with InternVL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        model_max_length=8192,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int, llm: str = "qwen2", vision: str = "300m"):
    """A random transformers-native InternVL model: a tiny InternViT and a tiny language model.

    InternLM2 is built as Llama (the same computation) and renamed when written in OpenGVLab's layout.
    Every parameter gets noise on top of transformers' initialisation, so that constants it initialises
    (layer scales, position embeddings, norm weights) still tell a wrong weight mapping apart.
    """
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

    vocab = -(-len(tokenizer) // 64) * 64
    text = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
    )
    if llm == "qwen2":
        text.update(model_type="qwen2", rope_theta=1000000.0)
    elif llm == "qwen3":  # head_dim 24, not 64 / 4 (Qwen3-0.6B's is not hidden / heads either); tied, as small Qwen3s
        text.update(model_type="qwen3", head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True)
    elif llm == "vicuna":  # Llama-2 (Vicuna v1.5, InternVL-Chat-V1-1's LLaMA2-13B): rope_theta 1e4, no scaling
        text.update(model_type="llama", rope_theta=10000.0, attention_bias=False, max_position_embeddings=4096)
    elif llm in ("llama", "internlm2"):
        text.update(model_type="llama", rope_theta=500000.0 if llm == "llama" else 1000000.0, attention_bias=False)
        if llm == "llama":  # Llama-3's rotary scaling, as in InternVL2-76B's language model
            text["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    elif llm == "phi3":
        half = 64 // 4 // 2  # head_dim / 2 factors
        text.update(model_type="phi3", rope_theta=10000.0, original_max_position_embeddings=256,
                    rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                                  "long_factor": [1.0 + 0.4 * i for i in range(half)]},
                    pad_token_id=tokenizer.pad_token_id)
    vision_cfg = dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=448,
        patch_size=56, layer_scale_init_value=0.1, use_mean_pooling=True,
    )
    if vision == "300m":
        vision_cfg.update(norm_type="layer_norm", attention_bias=True, use_qk_norm=False)
    else:  # InternViT-6B's shape of computation: RMSNorm, no qkv bias, full-width q/k norm
        vision_cfg.update(norm_type="rms_norm", attention_bias=False, use_qk_norm=True)
    config = InternVLConfig(
        vision_config=vision_cfg,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(448 // 56) ** 2 // 4,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1 if vision == "300m" else -2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text["tie_word_embeddings"],  # transformers 5 ties by this one, not text_config's
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def write_opengvlab(out: Path, model, llm: str, generation: int = 2) -> None:
    """Write a transformers-native model in OpenGVLab's InternVLChatModel layout (config and weights). Generation
    1 writes InternVL 1's tiling keys (InternVL-Chat-V1-2-Plus's fine-tune script, internvl_chat/shell/internvl1.2/
    2nd_finetune/*_full.sh: dynamic_image_size False, use_thumbnail False, ps_version v1), and min/max_dynamic_patch
    at InternVLChatConfig's defaults (1, 6), which a config that leaves tiling off must not act on."""
    from safetensors.torch import save_file

    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    weights = to_opengvlab_weights(model.state_dict(), cfg, llm)
    # Two shards and an index, as large checkpoints have.
    names = sorted(weights)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: weights[n].contiguous() for n in part}, out / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    text = t.to_dict()
    if llm == "internlm2":
        text = {
            "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": False,
            "eos_token_id": t.eos_token_id,
        }
    else:
        text["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                                  "vicuna": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[llm]]
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": OPENGVLAB_TEMPLATES[llm],
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": "v2" if generation == 2 else "v1",
        "select_layer": cfg.vision_feature_layer,
        "force_image_size": v.image_size[0],
        "dynamic_image_size": generation == 2,
        "use_thumbnail": generation == 2,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12 if generation == 2 else 6,
        "llm_config": text,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
            "image_size": v.image_size[0], "patch_size": v.patch_size[0], "num_channels": 3,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.attention_bias,
            "qk_normalization": v.use_qk_norm, "hidden_act": "gelu",
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    gen = {"eos_token_id": [model.generation_config.eos_token_id[0]],
           "pad_token_id": model.generation_config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def to_opengvlab_weights(state: dict, cfg, llm: str) -> dict:
    """transformers-native InternVL weight names -> OpenGVLab's (q/k/v fused in the vision tower; InternLM2's
    names and grouped wqkv for the language model when llm is internlm2)."""
    out = {}
    t = cfg.text_config
    state = {k.removeprefix("model."): v for k, v in state.items()}
    for name, w in state.items():
        if name.startswith("vision_tower."):
            rest = name.removeprefix("vision_tower.")
            if rest.startswith("encoder.layer."):
                i, sub = rest.removeprefix("encoder.layer.").split(".", 1)
                if sub.startswith(("attention.k_proj", "attention.v_proj")):
                    continue
                if sub.startswith("attention.q_proj"):
                    kind = sub.rsplit(".", 1)[1]
                    parts = [state[f"vision_tower.encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"vision_model.encoder.layers.{i}.attn.qkv.{kind}"] = torch.cat(parts)
                    continue
                sub = {"lambda_1": "ls1", "lambda_2": "ls2"}.get(sub, sub)
                for a, b in (("attention.projection_layer", "attn.proj"), ("attention.q_norm", "attn.q_norm"),
                             ("attention.k_norm", "attn.k_norm"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2")):
                    sub = sub.replace(a, b)
                out[f"vision_model.encoder.layers.{i}.{sub}"] = w
            else:
                rest = {"embeddings.cls_token": "embeddings.class_embedding",
                        "embeddings.position_embeddings": "embeddings.position_embedding"}.get(rest, rest)
                out["vision_model." + rest.replace("patch_embeddings.projection", "patch_embedding")] = w
        elif name.startswith("multi_modal_projector."):
            rest = name.removeprefix("multi_modal_projector.")
            for a, b in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
                rest = rest.replace(a, b)
            out["mlp1." + rest] = w
        elif llm != "internlm2":
            rest = name.removeprefix("language_model.").removeprefix("model.")
            if rest == "lm_head.weight" and t.tie_word_embeddings:
                continue  # the embeddings' own tensor: save_pretrained does not write it twice either
            out["language_model." + (rest if rest == "lm_head.weight" else "model." + rest)] = w
        else:
            out.update(_internlm2_weight(name, w, state, t))
    return out


def _internlm2_weight(name: str, w, state: dict, t) -> dict:
    rest = name.removeprefix("language_model.").removeprefix("model.")
    if rest == "lm_head.weight":
        return {"language_model.output.weight": w}
    if rest == "embed_tokens.weight":
        return {"language_model.model.tok_embeddings.weight": w}
    if rest == "norm.weight":
        return {"language_model.model.norm.weight": w}
    layer, sub = rest.removeprefix("layers.").split(".", 1)
    prefix = f"language_model.model.layers.{layer}."
    if sub in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return {}
    if sub == "self_attn.q_proj.weight":
        heads, kv, d = t.num_attention_heads, t.num_key_value_heads, t.hidden_size // t.num_attention_heads
        src = next(k for k in state if k.endswith(f"layers.{layer}.self_attn.q_proj.weight")).rsplit("q_proj", 1)[0]
        q = state[src + "q_proj.weight"].reshape(kv, heads // kv, d, -1)
        k = state[src + "k_proj.weight"].reshape(kv, 1, d, -1)
        v = state[src + "v_proj.weight"].reshape(kv, 1, d, -1)
        return {prefix + "attention.wqkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])}
    names = {"self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
             "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
             "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
    return {prefix + names[sub]: w}
