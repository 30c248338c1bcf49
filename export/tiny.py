"""Random-weight Qwen3-VL checkpoints in the exact Hugging Face format of the real one.

No model hub is reachable here, ever; tests and the demo need a real-format checkpoint to exercise the
real loading path (AutoProcessor / AutoModelForImageTextToText). `tiny` is ~20 M parameters (the real
151,936-row embedding is most of it); `2b` is the exact Qwen3-VL-2B-Instruct shape, for GPU benchmarks.
Weights are random, so answers are noise; shapes, tokens, batching, quantization and parity are real.
"""
from __future__ import annotations

import json
from pathlib import Path

from shelfsight.model import qwen

# Every decoder linear's input width is a multiple of 128 so that 4-bit group-128 GPTQ applies.
SHAPES = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5]),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                    deepstack_visual_indexes=[0, 1]),
        # A wide init makes the random model's greedy answer depend on the image and the question
        # (11 distinct answers for 12 image/question pairs, against 1 at the usual 0.02), so parity
        # and batching tests can tell requests apart.
        init_std=0.3,
    ),
    # between the two, for CPU benchmarks where prefill must cost something next to a decode step
    "small": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, mrope_section=[12, 10, 10]),
        vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4,
                    deepstack_visual_indexes=[0, 1, 2]),
        init_std=0.02,
    ),
    "2b": dict(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=[5, 11, 17]),
        init_std=0.02,
    ),
}

# What the real checkpoint's preprocessor_config.json says (its max is 16 M pixels; serving caps it).
IMAGE_PROCESSOR = dict(patch_size=qwen.PATCH_SIZE, merge_size=qwen.MERGE_SIZE,
                       temporal_patch_size=qwen.TEMPORAL_PATCH_SIZE, image_mean=[0.5, 0.5, 0.5],
                       image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 65_536, "longest_edge": 16_777_216})

GENERATION_CONFIG = dict(bos_token_id=qwen.ENDOFTEXT_ID, pad_token_id=qwen.ENDOFTEXT_ID,
                         eos_token_id=list(qwen.EOS_IDS), do_sample=True, temperature=0.7, top_p=0.8,
                         top_k=20, repetition_penalty=1.0)


def make_config(shape: str):
    from transformers import Qwen3VLConfig

    spec = SHAPES[shape]
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    text_config = dict(
        **text, vocab_size=qwen.VOCAB_SIZE, hidden_act="silu", max_position_embeddings=262_144,
        rms_norm_eps=1e-6, attention_bias=False, bos_token_id=qwen.ENDOFTEXT_ID,
        eos_token_id=qwen.IM_END_ID, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": mrope,
                         "mrope_interleaved": True},
    )
    vision_config = dict(
        **spec["vision"], hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=qwen.PATCH_SIZE,
        spatial_merge_size=qwen.MERGE_SIZE, temporal_patch_size=qwen.TEMPORAL_PATCH_SIZE,
        out_hidden_size=text["hidden_size"], num_position_embeddings=2304,
    )
    text_config["initializer_range"] = vision_config["initializer_range"] = spec["init_std"]
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config,
                         initializer_range=spec["init_std"],
                         image_token_id=qwen.IMAGE_PAD_ID, video_token_id=qwen.VIDEO_PAD_ID,
                         vision_start_token_id=qwen.VISION_START_ID, vision_end_token_id=qwen.VISION_END_ID,
                         tie_word_embeddings=True)


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR),
                            tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(),
                            chat_template=tokenizer.chat_template)


KINDS = ("generator", "embedding", "reranker")


def build(out: Path, shape: str = "tiny", seed: int = 0, device: str = "cpu", kind: str = "generator") -> None:
    """Write a random Qwen3-VL checkpoint of `shape` into the (empty, existing) directory `out`.
    The same seed writes byte-identical weight files.

    The three kinds share one format, as the real checkpoints do: Qwen3-VL-Embedding-2B and
    Qwen3-VL-Reranker-2B are Qwen3VLForConditionalGeneration checkpoints with tied embeddings, like the
    instruct model; what differs is how they are used (last-token pooling; the "yes"/"no" lm_head rows).
    `kind` is recorded in shelfsight-origin.json and seeds the weights apart from the generator's."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from shelfsight.export.tokenizer import build_tokenizer

    config = make_config(shape)
    torch.manual_seed(seed + 1000 * KINDS.index(kind))
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = build_tokenizer()
    build_processor(tokenizer).save_pretrained(out)
    (out / "shelfsight-origin.json").write_text(json.dumps(
        {"kind": "random", "model": kind, "shape": shape, "seed": seed,
         "parameters": sum(p.numel() for p in model.parameters())}, indent=1) + "\n")
