"""The result cache's parts, without servers: perceptual signatures and the in-memory store."""
from __future__ import annotations

import asyncio
import io

import pytest

from shelfsight.conversation import ASSISTANT, PICTURE, USER, Conversation, Turn
from PIL import Image

from shelfsight.gateway.cache import MemoryStore, make_key
from shelfsight.gateway.likeness import distance, near, signature
from shelfsight.gateway.settings import CacheSettings
from shelfsight.loadtest import images

DEFAULT = CacheSettings()
# Pairs of *different* product renders whose 256-bit pHashes are at most 10 bits apart (the closest
# among 300 renders, 44,850 pairs): pHash alone would serve one's answer for the other.
LOOK_ALIKES = [(140719340484, 140719340593), (140719340527, 140719340755), (140719340517, 140719340661)]


def render(seed: int) -> bytes:
    return images._jpeg(images._render(seed))


@pytest.mark.parametrize("a,b", LOOK_ALIKES)
def test_look_alike_products_are_not_perceptual_matches(a, b):
    sa, sb = signature(render(a), 256), signature(render(b), 256)
    assert distance(sa.phash, sb.phash) <= 10  # pHash alone (the old 10-bit bound): a false match
    assert near(sa, sb, DEFAULT.max_distance, DEFAULT.max_colour_distance) is None  # with colour: none


def test_reencoded_resized_copies_match():
    matched = 0
    for seed in range(40):
        original = images._render(seed)
        small = original.resize((int(original.width * 0.9), int(original.height * 0.9)), Image.BICUBIC)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=85)
        a, b = signature(images._jpeg(original), 256), signature(buf.getvalue(), 256)
        matched += near(a, b, DEFAULT.max_distance, DEFAULT.max_colour_distance) is not None
    assert matched >= 36  # measured 39 of 40 on these flat renders (pHash's hardest case)


def test_signature_round_trips_through_text():
    s = signature(render(7), 256)
    assert type(s).decode(s.encode()) == s and len(s.colour) == 48 and s.phash.bit_length() <= 256


def key(image=b"img", question="What brand?", system="", params=None, model_id="m@1", enhance=False, extra=None,
        pictures=None, conversation=None):
    return make_key(pictures or (image,), conversation or Conversation.ask(question, system or None),
                    params or {"temperature": 0.0}, model_id, enhance, extra)


def test_keys_cover_model_question_system_parameters_and_enhancement():
    k = key()
    assert key(question="  What   brand? ") == k  # whitespace is not a question
    for change in ({"question": "what brand?"}, {"system": "Be brief."}, {"params": {"temperature": 0.1}},
                   {"model_id": "m@2"}, {"enhance": True}, {"extra": {"stop": ["\n"]}}):
        assert key(**change).context != k.context, change
    assert key(image=b"other").exact != k.exact
    assert key(image=b"other").context == k.context


def test_keys_cover_every_picture_and_turn_in_order():
    two = Conversation.ask("Same product?", pictures=2)
    k = key(pictures=(b"a", b"b"), conversation=two)
    assert key(pictures=(b"b", b"a"), conversation=two).exact != k.exact  # the order of pictures counts
    assert key(pictures=(b"a", b"b", b"c"), conversation=Conversation.ask("Same product?", pictures=3)) != k
    turns = Conversation((Turn(USER, (PICTURE, "What is this?")), Turn(ASSISTANT, ("A mug.",)),
                          Turn(USER, ("Which brand?",))))
    other = Conversation((Turn(USER, (PICTURE, "What is this?")), Turn(ASSISTANT, ("A jar.",)),
                          Turn(USER, ("Which brand?",))))
    assert key(conversation=turns).context != key(conversation=other).context  # an earlier turn counts


def test_memory_store_bounds_bytes_ttl_and_lru():
    async def scenario():
        store = MemoryStore(max_bytes=3 * (100 + 256))
        for key in "abc":
            await store.put(key, "ctx", None, b"x" * 100, ttl=60)
        assert await store.get("a") == b"x" * 100  # a is now the most recently used
        await store.put("d", "ctx", None, b"x" * 100, ttl=60)  # evicts the least recently used: b
        assert store.keys() == ["c", "a", "d"]  # least recently used first
        assert await store.get("b") is None and await store.get("a") and await store.get("d")
        assert store.keys() == ["c", "a", "d"] and store.stats() == (3, 3 * 356)
        await store.put("e", "ctx", None, b"x" * 10, ttl=-1)  # already expired
        assert await store.get("e") is None
        await store.put("huge", "ctx", None, b"x" * 5000, ttl=60)  # larger than the whole cache
        assert await store.get("huge") is None
    asyncio.run(scenario())


def test_a_context_of_many_pictures_is_scanned_off_the_event_loop():
    """10,000 pictures asked the same question: the candidate scan must not hold the event loop."""
    import random
    import threading

    from shelfsight.gateway import cache
    from shelfsight.gateway.likeness import Signature

    rng = random.Random(0)
    store = cache.MemoryStore(1 << 30)
    sig = Signature(rng.getrandbits(256), bytes(rng.randrange(256) for _ in range(48)))

    async def scenario():
        for i in range(10_000):
            await store.put(f"k{i}", "ctx", Signature(rng.getrandbits(256), bytes(rng.randrange(256) for _ in range(48))),
                            b"v", ttl=60)
        await store.put("near", "ctx", sig, b"v", ttl=60)
        threads = []
        original = cache.near

        def spy(*a):
            threads.append(threading.current_thread())
            return original(*a)
        cache.near = spy
        try:
            found = await store.candidates("ctx", sig, 10, 4.0)
        finally:
            cache.near = original
        return found, threads
    found, threads = asyncio.run(scenario())
    assert found == ["near"]
    assert threads and all(t is not threading.main_thread() for t in threads)
