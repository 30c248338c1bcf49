"""The tiny checkpoint is a real-format Qwen3-VL: it loads through the Auto classes offline, generates,
and the same seed writes byte-identical files."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from shelfsight.export import tiny
from shelfsight.model import qwen


def test_loads_through_auto_classes_and_generates(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What brand is this?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (448, 448), (200, 40, 40))], return_tensors="pt")
    # 448x448 -> 28x28 patches of 16 -> 14x14 = 196 visual tokens after the 2x2 merge
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 28]]
    assert int((inputs["input_ids"] == qwen.IMAGE_PAD_ID).sum()) == 196
    assert tuple(inputs["pixel_values"].shape) == (784, 3 * 2 * 16 * 16)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_config_matches_real_layout(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["text_config"]["vocab_size"] == qwen.VOCAB_SIZE
    assert config["image_token_id"] == qwen.IMAGE_PAD_ID
    assert config["vision_config"]["patch_size"] == 16
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [qwen.IM_END_ID, qwen.ENDOFTEXT_ID]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "processor_config.json"):
        assert (tiny_checkpoint / name).exists(), name


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}


def test_same_seed_same_files_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir()
    other.mkdir()
    tiny.build(again, seed=0)
    tiny.build(other, seed=1)
    assert _digests(again) == _digests(tiny_checkpoint)
    assert _digests(other)["model.safetensors"] != _digests(tiny_checkpoint)["model.safetensors"]


def test_two_b_shape_config_is_the_real_one():
    config = tiny.make_config("2b")
    with torch.device("meta"):
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    # shared/notes/qwen3-vl-offline.md: 2.128 B in all, vision 0.407 B (tied embedding counted once)
    assert total == pytest.approx(2.128e9, rel=0.002)
    assert vision == pytest.approx(0.407e9, rel=0.003)
