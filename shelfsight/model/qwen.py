"""Facts about Qwen3-VL that several parts need: its special tokens, their ids and the checkpoint's
model type. The ids are those of the real Qwen3-VL vocabulary (151,643 BPE ranks + 26 added tokens)."""
from __future__ import annotations

MODEL_TYPE = "qwen3_vl"
BPE_RANKS = 151_643
VOCAB_SIZE = 151_936  # embedding rows in the real checkpoint (padded past the 151,669 tokens)

# Added tokens in id order from 151643; the first 14 are special (never split, skipped in decode).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
PLAIN_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
ADDED_TOKENS = SPECIAL_TOKENS + PLAIN_ADDED_TOKENS

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
# Generation stops on either: <|im_end|> ends a chat turn, <|endoftext|> ends a document.
EOS_IDS = (IM_END_ID, ENDOFTEXT_ID)

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# One visual token per (patch * merge)^2 pixels after the 2x2 merge: 32x32 for Qwen3-VL.
PIXELS_PER_TOKEN = (PATCH_SIZE * MERGE_SIZE) ** 2
