"""A perceptual hit must mean "the model would see the same thing": pinned text-only pairs (the issue's
TEA $4.99/$9.99 among them) are misses, copies of one picture are hits, in memory and in a real
redis-server. The full set and the rates are in bench/perceptual_pairs.py."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from bench import perceptual_pairs as pp
from shelfsight.gateway import cache, likeness
from shelfsight.gateway.settings import CacheSettings
from tests.test_gateway import redis_url  # noqa: F401  (fixture: a real redis-server on a free port)

BOLD, MONO = "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf"
GREEN = (40, 150, 70)
# The closest calls of the bench's set (smallest worst-pixel difference), and the issue's other pairs.
PINNED = [
    pp.Label("SALE", "$19.00", "latin", BOLD, 24, (640, 640), GREEN, 0),  # -> $18.00
    pp.Label("SHOES", "Size 8", "latin", BOLD, 24, (800, 600), (240, 240, 235), 20),  # -> Size 9
    pp.Label("ITEM", "SKU 12345", "latin", MONO, 32, (640, 640), (40, 80, 190), -30),  # -> SKU 12346
    pp.Label("SPORT", "NIKE", "latin", BOLD, 40, (480, 640), (200, 40, 40), 0),  # -> MIKE
    pp.Label("牛奶", "生产日期 2025年", "zh", BOLD, 24, (640, 640), GREEN, 10),  # -> 2026年
    pp.Label("方便面", "康师傅", "zh", "DejaVuSansCondensed-Bold.ttf", 32, (640, 640), (235, 200, 40), 0),
    pp.Label("薬局", "ドラッグ", "ja", BOLD, 32, (640, 640), (40, 80, 190), 0),  # -> トラッグ
    # white on yellow: 63 grey levels of contrast; the unweighed worst pixel let this one through
    pp.Label("饮料", "雪碧", "zh", MONO, 24, (800, 600), (235, 200, 40), 15),  # -> 雪璧
]
CHANGED = {"$19.00": "$18.00", "Size 8": "Size 9", "SKU 12345": "SKU 12346", "NIKE": "MIKE",
           "生产日期 2025年": "生产日期 2026年", "康师傅": "康帅傅", "ドラッグ": "トラッグ",
           "雪碧": "雪璧"}
COPIES = ["jpeg q70", "resize 80%", "crop 1% left", "crop 1% all sides", "crop 1% + resize 90% + q80"]


def text_pairs() -> list[tuple[bytes, bytes]]:
    return [pp.issue_pair()] + [(pp.jpeg(pp.render(a)), pp.jpeg(pp.render(replace(a, text=CHANGED[a.text]))))
                                for a in PINNED]


async def served(rc: cache.ResultCache, stored: bytes, asked: bytes, question="Read the label.") -> str | None:
    """Store an answer for `stored` as the gateway does after a miss, then ask with `asked`."""
    key = lambda image: cache.make_key(image, question, "", {"temperature": 0.0}, "m@1", False)  # noqa: E731
    probe = cache.Probe(key(stored))
    if await rc.lookup(probe, stored, lambda *_: None) is None:
        await rc.put(probe, stored, cache.CachedAnswer(f"answer for {len(stored)}", "m@1", 1, 1, "stop", time.time()))
    found = await rc.lookup(cache.Probe(key(asked)), asked, lambda *_: None)
    return found[1] if found else None


def memory_cache(settings=CacheSettings()) -> cache.ResultCache:
    return cache.ResultCache(settings, cache.MemoryStore(settings.max_bytes))


@pytest.mark.parametrize("index", range(len(PINNED) + 1))
def test_text_changes_are_misses_though_the_hash_finds_them(index):
    a, b = text_pairs()[index]
    hash_only = replace(CacheSettings(), verify=False)  # the candidate stage alone would serve it
    assert asyncio.run(served(memory_cache(hash_only), a, b)) == "perceptual"
    assert asyncio.run(served(memory_cache(), a, b)) is None


def test_copies_of_one_picture_are_hits():
    img = pp.render(PINNED[0])
    for name in COPIES:
        assert asyncio.run(served(memory_cache(), pp.jpeg(img), pp.variant(img, **pp.VARIANTS[name]))) == \
            "perceptual", name


def test_the_right_candidate_among_look_alikes_is_found():
    """$4.99 and $9.99 both cached: a re-encoded $9.99 gets $9.99's answer, not the nearer hash's."""
    a, b = pp.issue_pair()
    b_copy = pp.variant(pp.render(replace(pp.Label("TEA", "$9.99", "latin", BOLD, 40, (640, 640), GREEN, 0))),
                        quality=75, scale=0.9)

    async def scenario():
        rc = memory_cache()
        await served(rc, a, a)
        await served(rc, b, b)
        key = cache.make_key(b_copy, "Read the label.", "", {"temperature": 0.0}, "m@1", False)
        found = await rc.lookup(cache.Probe(key), b_copy, lambda *_: None)
        return found[0].text
    assert asyncio.run(scenario()) == f"answer for {len(b)}"


def test_redis_store_keeps_what_the_check_needs(redis_url):  # noqa: F811
    async def scenario():
        rc = cache.ResultCache(CacheSettings(redis_url=redis_url))
        try:
            out = []
            for a, b in text_pairs()[:3]:
                out.append(await served(rc, a, b))
            img = pp.render(PINNED[1])
            out.append(await served(rc, pp.jpeg(img), pp.variant(img, **pp.VARIANTS["crop 1% + resize 90% + q80"])))
            return out
        finally:
            await rc.close()
    assert asyncio.run(scenario()) == [None, None, None, "perceptual"]


def test_thumbnail_is_bounded_and_round_trips():
    a, _ = pp.issue_pair()
    t = likeness.thumbnail(likeness.decode_picture(a), 512)
    raw = t.encode()
    assert t.pixels.shape == (512, 512) and len(raw) < 512 * 512
    assert (likeness.Thumbnail.decode(raw).pixels == t.pixels).all()
    assert likeness.thumbnail(likeness.decode_picture(pp.jpeg(pp.render(replace(PINNED[0], canvas=(300, 200))))),
                           512).pixels.shape == (200, 300)  # never enlarged


def test_memory_store_counts_thumbnails_in_its_bytes():
    async def scenario():
        store = cache.MemoryStore(max_bytes=10_000)
        await store.put("a", "ctx", None, b"x" * 100, ttl=60, thumb=b"t" * 5000)
        assert store.stats() == (1, 100 + 5000 + cache.ENTRY_OVERHEAD)
        await store.put("b", "ctx", None, b"x" * 100, ttl=60, thumb=b"t" * 5000)  # evicts a
        return await store.get("a"), await store.thumbnail("b")
    assert asyncio.run(scenario()) == (None, b"t" * 5000)


def test_gateway_asks_the_model_for_the_second_tea_label(gateway):
    """The issue's reproduction through a real gateway and tritonserver (the tiny model's text is noise;
    where the answer came from is what counts)."""
    from shelfsight.client import ShelfsightClient
    from tests.test_gateway import GREEDY, target

    a, b = pp.issue_pair()
    tea = pp.render(pp.Label("TEA", "$4.99", "latin", BOLD, 40, (640, 640), GREEN, 0))
    q = "Read the label. What is the price?"
    with ShelfsightClient(target(gateway)) as c:
        first = c.recognize(a, q, **GREEDY)
        second = c.recognize(b, q, **GREEDY)
        copy = c.recognize(pp.variant(tea, quality=80, scale=0.9, crop=(0.005, 0, 0, 0)), q, **GREEDY)
    assert [first.cache_status, second.cache_status, copy.cache_status] == ["miss", "miss", "perceptual"]
    assert copy.text == first.text


def test_pictures_too_small_to_check_are_never_vouched_for():
    from PIL import Image

    tiny = pp.jpeg(Image.new("RGB", (24, 24), (40, 150, 70)))
    assert likeness.difference(likeness.decode_picture(tiny), likeness.thumbnail(likeness.decode_picture(tiny), 512)) == float("inf")
    assert asyncio.run(served(memory_cache(), tiny, pp.jpeg(Image.new("RGB", (24, 24), (41, 150, 70))))) is None
