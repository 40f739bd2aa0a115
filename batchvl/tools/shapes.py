"""Published model shapes (from the checkpoints' configs), for random-weight checks and benchmarks.

Each shape is a (vision config, text config) pair in transformers-native InternVL form.
"""

from __future__ import annotations

QWEN2_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151655, rope_theta=1000000.0,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False)
PHI3_MINI_128K = dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192, vocab_size=32020, rope_theta=10000.0,
                      max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False,
                      # The real factor lists are not at hand; these have the right length (head_dim / 2).
                      rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.002 * i for i in range(48)],
                                    "long_factor": [1.0 + 0.4 * i for i in range(48)]})
VIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                norm_type="layer_norm", attention_bias=True, use_qk_norm=False, image_size=448, patch_size=14)
# InternViT-6B-448px-V1-5 (InternVL 1.5, InternVL2-26B, -40B and -76B): 45 layers (the 48-layer InternViT-6B with its
# last 3 dropped, from V1-2 on), RMSNorm, q/k normalisation, no qkv bias. Not verified against the 40B and 76B
# checkpoints' own vision_config and select_layer here: InternVLChatConfig's default select_layer in InternVL 2.0's
# code is -1 (every layer runs), which these shapes use; InternVL-Chat-V1-2's default was -4.
VIT_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
              norm_type="rms_norm", attention_bias=False, use_qk_norm=True, image_size=448, patch_size=14)
TINY_TEXT = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512, max_position_embeddings=8192,
                 tie_word_embeddings=False)
TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                norm_type="layer_norm", attention_bias=True, use_qk_norm=False, image_size=448, patch_size=56)

# InternLM2 shapes are written as Llama (the same computation, transformers-native), so that transformers
# can run the baseline on the same weights without InternLM2's remote code.
INTERNLM2_1_8B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=8, intermediate_size=8192, vocab_size=92553, rope_theta=1000000.0,
                      max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)
INTERNLM2_5_7B = dict(INTERNLM2_1_8B, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336)
INTERNLM2_20B = dict(INTERNLM2_1_8B, hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                     num_key_value_heads=8, intermediate_size=16384)
# InternVL3.5-8B's language model, Qwen3-8B: hidden 4096, 36 layers, 32 heads of head_dim 128, 8 kv heads, intermediate
# 12288, vocab 151936, rope_theta 1e6, 40960 positions, untied embeddings; per-head q/k RMSNorm (model_type qwen3).
# InternVL3_5-8B's own llm_config says the same, vocab 151936 included, as a copy of its config.json shows it
# (github.com YellowPerson792/ByteCaption, InternVL3_5-8B/config.json; template internvl2_5, select_layer -1, ps v2).
QWEN3_8B = dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936, rope_theta=1000000.0,
                max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN2_5_7B = dict(QWEN2_05B, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=151674)

# InternVL2-40B's language model, NousResearch/Nous-Hermes-2-Yi-34B (a Llama architecture). Every figure is that
# model's config.json as copies of it show it (their `_name_or_path` names it: e.g. huggingface.co
# neuralmagic/Nous-Hermes-2-Yi-34B-pruned50, dfurman/HermesBagel-34B-v0.1, and the llm_config of OpenGVLab's own
# InternVL-Chat-V1-2, the same Yi-34B shape): hidden 7168, 60 layers, 56 heads, 8 kv heads, intermediate 20480,
# rope_theta 5e6, 4096 positions, rms_norm_eps 1e-5, untied embeddings, vocab 64000.
# Not verified: the vocab_size in OpenGVLab/InternVL2-40B's own llm_config (it may count the added <img>,
# <IMG_CONTEXT>, ... tokens); the base model's 64000 stands in for it, a difference of at most a few rows.
YI_34B = dict(model_type="llama", hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
              num_key_value_heads=8, intermediate_size=20480, vocab_size=64000, rope_theta=5000000.0,
              max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# InternVL2-Llama3-76B's language model, NousResearch/Hermes-2-Theta-Llama-3-70B. OpenGVLab's
# InternVL2-Llama3-76B config.json names it in llm_config (`_name_or_path`, architectures LlamaForCausalLM);
# the figures are its config.json as a copy shows it (huggingface.co
# PedroPareja/Hermes-2-Theta-L3-Euryale-Ties-0.8-70B-4.5bpw-exl2, `_name_or_path` the Nous model), and the same
# as NousResearch/Hermes-2-Pro-Llama-3-70B's own config.json: hidden 8192, 80 layers, 64 heads, 8 kv heads,
# intermediate 28672, rope_theta 5e5, 8192 positions, rms_norm_eps 1e-5, untied, vocab 128256.
# Not verified: the vocab_size in InternVL2-Llama3-76B's llm_config (it may count added tokens); 128256 stands in.
LLAMA3_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)

SHAPES = {
    "tiny": (TINY_VIT, TINY_TEXT),
    "internvl2-2b": (VIT_300M, INTERNLM2_1_8B),  # InternViT-300M + InternLM2-1.8B
    "internvl2-8b": (VIT_300M, INTERNLM2_5_7B),  # InternViT-300M + InternLM2.5-7B
    "internvl3-8b": (VIT_300M, QWEN2_5_7B),  # InternViT-300M + Qwen2.5-7B
    "internvl3_5-8b": (VIT_300M, QWEN3_8B),  # InternViT-300M + Qwen3-8B (the vision side of InternVL3-8B)
    "internvl2-26b": (VIT_6B, INTERNLM2_20B),  # InternViT-6B + InternLM2-20B
    "internvl2-40b": (VIT_6B, YI_34B),  # InternViT-6B-448px-V1-5 + Nous-Hermes-2-Yi-34B
    # InternVL-Chat-V1-2 / -V1-2-Plus: InternViT-6B-448px-V1-2 (the 45-layer, select_layer -1 tower of VIT_6B:
    # OpenGVLab/InternVL internvl_chat/shell/internvl1.2/*.sh pass --vision_select_layer -1) + Nous-Hermes-2-Yi-34B.
    # Its one 448 px tile per image is check_parity's MAX_TILES; its v1 pixel shuffle is a reordering of these
    # tensors that transformers cannot express, checked on tiny checkpoints (tests/test_native_parity.py, gen1).
    "internvl-chat-v1-2": (VIT_6B, YI_34B),
    "internvl2-76b": (VIT_6B, LLAMA3_70B),  # InternViT-6B-448px-V1-5 + Hermes-2-Theta-Llama-3-70B
    "internvl2-1b": (VIT_300M, QWEN2_05B),  # InternViT-300M + Qwen2-0.5B (InternVL2-1B, 2.5-1B)
    "internvl2-4b": (VIT_300M, PHI3_MINI_128K),  # InternViT-300M + Phi-3-mini-128k (InternVL2-4B)
    "internvit-6b": (VIT_6B, QWEN2_05B),  # InternViT-6B-448px (InternVL 1.5, 2-26B and up) + a small LLM
}


