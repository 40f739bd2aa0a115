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
QWEN2_5_7B = dict(QWEN2_05B, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=151674)

SHAPES = {
    "tiny": (TINY_VIT, TINY_TEXT),
    "internvl2-2b": (VIT_300M, INTERNLM2_1_8B),  # InternViT-300M + InternLM2-1.8B
    "internvl2-8b": (VIT_300M, INTERNLM2_5_7B),  # InternViT-300M + InternLM2.5-7B
    "internvl3-8b": (VIT_300M, QWEN2_5_7B),  # InternViT-300M + Qwen2.5-7B
    "internvl2-26b": (VIT_6B, INTERNLM2_20B),  # InternViT-6B + InternLM2-20B
    "internvl2-1b": (VIT_300M, QWEN2_05B),  # InternViT-300M + Qwen2-0.5B (InternVL2-1B, 2.5-1B)
    "internvl2-4b": (VIT_300M, PHI3_MINI_128K),  # InternViT-300M + Phi-3-mini-128k (InternVL2-4B)
    "internvit-6b": (VIT_6B, QWEN2_05B),  # InternViT-6B-448px (InternVL 1.5, 2-26B and up) + a small LLM
}


