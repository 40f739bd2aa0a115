"""`batchvl make-tiny-model`: a small random InternVL checkpoint, written the way real ones are.

It holds real safetensors weights, a config, a generation config, a preprocessor config and a byte-level
BPE tokenizer with InternVL's special tokens and a chat template, so tests and the demo load it through
exactly the code path a real checkpoint takes. Everything is derived from the seed: the same seed gives
the same files. The weights are random, so the text it produces is noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MARKER = "batchvl-tiny.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
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


def tiny_config(seed: int) -> dict:
    return {"seed": seed, "version": 1, "vision": "300m-tiny", "llm": "qwen2-tiny", "layout": "hf"}


def make_tiny_model(out_dir: Path, seed: int = 0, force: bool = False) -> bool:
    """Write the tiny checkpoint into `out_dir`. Returns False when an identical one is already there."""
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    wanted = tiny_config(seed)
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
    tokenizer.save_pretrained(tmp)
    model = build_model(tokenizer, seed)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (tmp / MARKER).write_text(json.dumps(wanted))
    tmp.rename(out_dir)
    return True


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


def build_model(tokenizer, seed: int):
    """A random transformers-native InternVL model: InternViT (tiny) + Qwen2 (tiny)."""
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

    vocab = -(-len(tokenizer) // 64) * 64
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=448, patch_size=56, norm_type="layer_norm", layer_scale_init_value=0.1,
            attention_bias=True, use_qk_norm=False, use_mean_pooling=True,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_theta=1000000.0, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            initializer_range=0.2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(448 // 56) ** 2 // 4,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model
