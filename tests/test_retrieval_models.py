"""The retrieval models on a real tritonserver (`embed`, `rerank`, tiny random checkpoints in the
Qwen3-VL-Embedding and -Reranker formats, fp32 on CPU): parity with the reference pooling over
transformers' own models, alone and batched with other inputs; Matryoshka sizes; per-request errors."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from shelfsight import errors, params
from shelfsight.engine import Encoder, Prompt
from shelfsight.engine.config import EncoderConfig
from shelfsight.model import imaging
from shelfsight.model.checkpoint import load_model
from shelfsight.model.preprocessing import load_preprocessor
from shelfsight.model.retrieval import NO, YES, Side, embedding_messages, rerank_messages
from shelfsight.serving.pipeline import Item, PipelineClient
from tests.conftest import run
from tests.test_serving import pictures

SIZE = {"shortest_edge": 65_536, "longest_edge": 1_048_576}
ITEMS = [Item("Acme instant coffee, 200 g jar"), Item("", (pictures()[0],)), Item("red kettle", (pictures()[1],)),
         Item("", (pictures()[2], pictures()[3])), Item()]


def processor_inputs(checkpoint, messages, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[imaging.decode(p) for p in images] or None, size=SIZE, return_tensors="pt")


def reference_embedding(checkpoint, item: Item, instruction=None) -> np.ndarray:
    """The reference pooling over transformers' Qwen3VLModel: the last token's final hidden state, L2-normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inp = processor_inputs(checkpoint, embedding_messages(Side(len(item.pictures), item.text), instruction),
                           item.pictures)
    with torch.inference_mode():
        h = model(**inp).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(h, dim=0).numpy()


def reference_score(checkpoint, query: Item, doc: Item) -> float:
    """sigmoid(logit_yes - logit_no) of transformers' Qwen3VLForConditionalGeneration at the last token."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vocab = AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    messages = rerank_messages(Side(len(query.pictures), query.text), Side(len(doc.pictures), doc.text))
    inp = processor_inputs(checkpoint, messages, query.pictures + doc.pictures)
    with torch.inference_mode():
        logits = model(**inp).logits[0, -1]
    return float(torch.sigmoid(logits[vocab[YES]] - logits[vocab[NO]]))


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


async def embed(server, items, **kw):
    client = PipelineClient(server.grpc_url)
    try:
        return await client.embed(items, **kw)
    finally:
        await client.close()


async def rerank(server, query, docs, **kw):
    client = PipelineClient(server.grpc_url)
    try:
        return await client.rerank(query, docs, **kw)
    finally:
        await client.close()


def test_embed_equals_the_reference_pooling_alone_and_batched(triton, tiny_embedding):
    expected = [reference_embedding(tiny_embedding, item) for item in ITEMS]
    alone = [run(embed(triton, [item]))[0] for item in ITEMS]
    together = run(embed(triton, ITEMS))  # concurrent requests: Triton batches them into shared forwards
    for want, one, many in zip(expected, alone, together):
        assert one.vector.shape == (128,) and abs(float(np.linalg.norm(one.vector)) - 1) < 1e-5
        assert cosine(one.vector, want) >= 0.9999 and cosine(many.vector, want) >= 0.9999
    assert len({round(float(e.vector[0]), 6) for e in together}) == len(ITEMS)  # inputs give different vectors
    assert together[1].prompt_tokens > together[0].prompt_tokens  # a picture's visual tokens


def test_instruction_and_matryoshka_sizes(triton, tiny_embedding):
    item = ITEMS[2]
    instructed = run(embed(triton, [item], instruction="Find the product in this photo"))[0]
    assert cosine(instructed.vector, reference_embedding(tiny_embedding, item, "Find the product in this photo")) >= 0.9999
    full, small = run(embed(triton, [item]))[0], run(embed(triton, [item], dimensions=32))[0]
    assert small.vector.shape == (32,) and abs(float(np.linalg.norm(small.vector)) - 1) < 1e-5
    assert cosine(small.vector, full.vector[:32]) >= 0.9999


def test_rerank_equals_the_reference_formula(triton, tiny_reranker):
    query = Item("coffee jar", (pictures()[4],))
    docs = [Item("Acme instant coffee"), Item("", (pictures()[5],)), Item("kettle", (pictures()[6],))]
    got = run(rerank(triton, query, docs))
    want = [reference_score(tiny_reranker, query, d) for d in docs]
    assert np.allclose(got, want, atol=1e-4), (got, want)
    assert all(0 < s < 1 for s in got) and len(set(round(s, 6) for s in got)) == 3


def test_one_bad_request_fails_alone(triton):
    async def go():
        client = PipelineClient(triton.grpc_url)
        try:
            return await asyncio.gather(client.embed([ITEMS[0]]), client.embed([Item("x", (b"not a picture",))]),
                                        client.embed([ITEMS[1]]), client.embed([ITEMS[0]], dimensions=4096),
                                        return_exceptions=True)
        finally:
            await client.close()
    good, bad, good2, too_wide = run(go())
    assert isinstance(bad, errors.InvalidArgument) and "not a supported format" in bad.message
    assert isinstance(too_wide, errors.InvalidArgument) and "dimensions must be between 1 and 128" in too_wide.message
    assert not isinstance(good, Exception) and not isinstance(good2, Exception)


def test_encoder_groups_by_padded_tokens(tiny_embedding):
    """In process: prompts sorted by length, each forward within the padded-token budget, results in order."""
    model = load_model(tiny_embedding, dtype="float32")
    pre = load_preprocessor(tiny_embedding, 65_536, 1_048_576, imaging.ImageLimits(), params.Limits())
    prompts = [Prompt.of(pre.render(embedding_messages(Side(len(i.pictures), i.text)), list(i.pictures))) for i in ITEMS]
    lengths = [p.input_ids.numel() for p in prompts]
    small = Encoder(model, pre.tokenizer, "embedding", EncoderConfig(max_batch_tokens=max(lengths) * 2))
    groups = small.groups(prompts)
    assert sorted(i for g in groups for i in g) == list(range(len(prompts)))
    assert all(len(g) * max(lengths[i] for i in g) <= max(lengths) * 2 for g in groups if len(g) > 1)
    big = Encoder(model, pre.tokenizer, "embedding", EncoderConfig(max_batch_tokens=1 << 20))
    assert len(big.groups(prompts)) == 1
    a, b = small.embed(prompts, [0] * len(prompts)), big.embed(prompts, [0] * len(prompts))
    assert all(cosine(x.numpy(), y.numpy()) >= 0.9999 for x, y in zip(a, b))
    with pytest.raises(errors.FailedPrecondition, match="scores come from a reranker"):
        big.score(prompts)
