"""How close a quantized checkpoint stays to its bf16 source, on held-out samples.

Two figures per candidate, both against the bf16 model on the same inputs, read by the same kernel:
  logit_cosine      cosine of the last prompt token's logits (mean and min over samples)
  token_agreement   the bf16 model answers greedily (NEW_TOKENS tokens); then BOTH models read the
                    prompt + that answer in one teacher-forced forward, and we count how often the
                    candidate's top-1 next token equals the bf16 model's top-1 from that same forward.
                    Unlike comparing two free runs, one early flip does not condemn every later
                    position. The answer text only chooses what both models read: top-1s are never
                    compared with generate()'s own tokens, whose incremental (KV-cache) kernels can
                    break a near-tie the other way than one full forward does on some CPUs, so an
                    identical candidate scores exactly 1.0 on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEW_TOKENS = 16


def prepare(processor, samples, max_pixels: int) -> list[dict]:
    size = {"shortest_edge": processor.image_processor.size["shortest_edge"], "longest_edge": max_pixels}
    out = []
    for s in samples:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(processor(text=[text], images=[s.image], size=size, return_tensors="pt"))
    return out


def _forced(inp: dict, answer: torch.Tensor) -> dict:
    """The prompt followed by a given answer, as one teacher-forced input."""
    ids = torch.cat([inp["input_ids"], answer[None]], dim=1)
    return dict(inp, input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=torch.cat([inp["mm_token_type_ids"], torch.zeros_like(answer[None])], dim=1))


@torch.no_grad()
def _answer_logits(model, inp: dict, answer: torch.Tensor) -> torch.Tensor:
    """Logits [1 + len(answer), V] that predict each answer token, starting at the last prompt token."""
    prompt_len = inp["input_ids"].shape[1]
    return model(**_forced(inp, answer)).logits[0, prompt_len - 1: prompt_len - 1 + len(answer) + 1].float()


@dataclass(frozen=True)
class Reference:
    """What the bf16 model does on one held-out sample, all from one teacher-forced forward."""

    answer: torch.Tensor  # [NEW_TOKENS] its greedy answer: the text both models read
    top1: torch.Tensor  # [NEW_TOKENS] its top-1 before each answer token, on that forward
    logits: torch.Tensor  # [V] float32, at the last prompt token


@torch.no_grad()
def reference_runs(model, inputs: list[dict]) -> list[Reference]:
    runs = []
    for inp in inputs:
        prompt_len = inp["input_ids"].shape[1]
        seq = model.generate(**inp, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             repetition_penalty=1.0)
        answer = seq[0, prompt_len:]
        logits = _answer_logits(model, inp, answer)
        runs.append(Reference(answer=answer, top1=logits[: len(answer)].argmax(-1), logits=logits[0]))
    return runs


@torch.no_grad()
def compare(model, inputs: list[dict], runs: list[Reference]) -> dict:
    cosines, agree, total = [], 0, 0
    for inp, ref in zip(inputs, runs):
        logits = _answer_logits(model, inp, ref.answer)
        cosines.append(torch.nn.functional.cosine_similarity(logits[0].double(), ref.logits.double(), dim=0).item())
        agree += int((logits[: len(ref.answer)].argmax(-1) == ref.top1).sum())
        total += len(ref.answer)
    return {"samples": len(inputs), "logit_cosine_mean": round(sum(cosines) / len(cosines), 6),
            "logit_cosine_min": round(min(cosines), 6), "token_agreement": round(agree / total, 4),
            "tokens": total}
