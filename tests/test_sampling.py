"""Sampling and detokenization units: the same semantics as transformers, and exact text streaming."""
from __future__ import annotations

import random

import pytest
import torch

from shelfsight.engine import sampling
from shelfsight.engine.detokenize import IncrementalDetokenizer
from shelfsight.params import GenerationParams


def hf_kept(logits, seen_ids, penalty, temperature, top_k, top_p):
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    scores = RepetitionPenaltyLogitsProcessor(penalty)(seen_ids[None], logits[None].clone())
    scores = TemperatureLogitsWarper(temperature)(seen_ids[None], scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(seen_ids[None], scores)
    scores = TopPLogitsWarper(top_p)(seen_ids[None], scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("top_k,top_p", [(20, 0.85), (0, 0.9), (5, 1.0), (50, 0.3), (0, 0.05)])
def test_candidates_match_transformers(top_k, top_p):
    torch.manual_seed(top_k + int(top_p * 100))
    vocab = 5000
    logits = torch.randn(3, vocab) * 3
    seen_ids = torch.randint(0, vocab, (3, 40))
    seen = torch.zeros(3, vocab, dtype=torch.bool)
    seen.scatter_(1, seen_ids, True)
    penalized = sampling.penalize(logits, seen, torch.tensor([1.1, 1.1, 1.1]))
    values, indices, keep = sampling.candidates(penalized / 0.7, torch.tensor([top_k] * 3),
                                                torch.tensor([top_p] * 3))
    for row in range(3):
        mine = set(indices[row][keep[row]].tolist())
        theirs = hf_kept(logits[row], seen_ids[row], 1.1, 0.7, top_k, top_p)
        if len(theirs) <= sampling.K_MAX:
            assert mine == theirs
        else:  # the documented limit: the K_MAX most likely of what transformers keeps
            assert len(mine) == sampling.K_MAX and mine <= theirs


def params(rows: list[GenerationParams], seeds: list[int]) -> sampling.RowParams:
    return sampling.RowParams(torch.tensor([r.temperature for r in rows]), torch.tensor([r.top_k for r in rows]),
                              torch.tensor([r.top_p for r in rows]),
                              torch.tensor([r.repetition_penalty for r in rows]), torch.tensor(seeds))


def test_greedy_takes_argmax_of_penalized_logits():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    seen = torch.tensor([[False, True, False, False]])
    pos = torch.tensor([0])
    p = GenerationParams(temperature=0.0, repetition_penalty=1.1)
    # 3.0 / 1.1 = 2.73 < 2.9: the penalty moves the choice from token 1 to token 2
    for greedy_only in (True, False):
        assert sampling.sample(logits, seen, params([p], [0]), pos, greedy_only).tolist() == [2]
    plain = GenerationParams(temperature=0.0, repetition_penalty=1.0)
    assert sampling.sample(logits, seen, params([plain], [0]), pos, False).tolist() == [1]


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    seen = torch.zeros(4, 1000, dtype=torch.bool)
    p = GenerationParams(temperature=1.0, top_k=0, top_p=1.0)

    def run(n, seeds, position):
        pos = torch.full((n,), position)
        return sampling.sample(logits[:n], seen[:n], params([p] * n, seeds), pos, False).tolist()

    alone = [run(1, [42], t)[0] for t in range(40)]
    in_batch = [run(3, [42, 7, 8], t)[0] for t in range(40)]
    assert alone == in_batch
    assert len(set(alone)) > 20  # the position moves the noise: draws differ step to step
    assert alone != [run(1, [43], t)[0] for t in range(40)]


def test_noise_never_reaches_one():
    """Token 15,340,575 at seed 0, position 0 hashes to the top 24-bit value: its noise must stay below 1
    (at 1.0 the Gumbel noise is +inf, and +inf on a ruled-out token is NaN, which argmax picks)."""
    u = sampling.uniform(torch.tensor([0]), torch.tensor([0]), torch.tensor([[15_340_575, 7]]))
    assert float(u[0, 0]) == 1.0 - 2.0 ** -24 and 0.0 < float(u[0, 1]) < 1.0
    logits = torch.full((1, 15_340_576), float("-inf"))
    logits[0, 7] = 0.0  # the only allowed token, beside the one whose noise is the largest
    p = params([GenerationParams(temperature=1.0, top_k=0, top_p=1.0)], [0])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    assert sampling.sample(logits, seen, p, torch.tensor([0]), False).tolist() == [7]


def test_sampled_frequencies_follow_the_distribution():
    """Gumbel-max over hashed noise samples softmax(logits / T): check the frequencies of 4 tokens."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4).contiguous()
    seen = torch.zeros(4000, 4, dtype=torch.bool)
    rows = [GenerationParams(temperature=1.0, top_k=0, top_p=1.0)] * 4000
    tok = sampling.sample(logits, seen, params(rows, list(range(4000))), torch.arange(4000), False)
    freq = torch.bincount(tok, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top_k 2 keeps only the first two, renormalized
    rows = [GenerationParams(temperature=1.0, top_k=2, top_p=1.0)] * 4000
    tok = sampling.sample(logits, seen, params(rows, list(range(4000))), torch.arange(4000), False)
    assert set(tok.tolist()) == {0, 1}
    assert abs(float((tok == 0).float().mean()) - 0.625) < 0.03


@pytest.fixture(scope="module")
def tokenizer():
    from shelfsight.export.tokenizer import build_tokenizer

    return build_tokenizer()


def test_incremental_detokenizer_equals_full_decode(tokenizer):
    rng = random.Random(0)
    texts = ["净含量 500毫升 🙂👍🏽 café", "Brand: Lumora — Hydrating Lotion 50 ml", "ミドリ堂の緑茶 ✨✨"]
    ids = [tid for t in texts for tid in tokenizer.encode(t)]
    for trial in range(20):  # random token streams, including ones that split characters
        stream = [rng.choice(ids) for _ in range(rng.randint(1, 60))]
        if trial % 3 == 0:
            stream = [rng.randint(0, 151_642) for _ in range(30)]
        d = IncrementalDetokenizer(tokenizer)
        deltas = [d.push(t) for t in stream] + [d.flush()]
        full = tokenizer.decode(stream, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(deltas) == full
        if "\ufffd" not in full:  # no delta ever shows half a character
            assert not any("\ufffd" in delta for delta in deltas)
