"""The catalog: one row per item (text, metadata, an embedding), searched by vector, by text, or both.

Tables (N = the catalog's `name`, so that one Postgres holds several catalogs):
  shelfsight_catalog_schema(catalog, version, applied_at)  which migrations ran, per catalog
  N_meta(model_id, dim, created)                           one row: what made the embeddings
  N_items(id, text, metadata jsonb, embedding halfvec(D), content_hash, tsv, updated_at)
    HNSW (halfvec_ip_ops) on embedding, GIN on tsv, GIN (jsonb_path_ops) on metadata

`halfvec`, not `vector`: pgvector's HNSW indexes at most 2,000 dimensions of `vector` but 4,000 of
`halfvec`, and Qwen3-VL-Embedding-2B gives 2,048. Embeddings are L2-normalised, so similarity is the
inner product; `<#>` is its negative (ascending, for the index). Every score returned is higher-better.

Full text uses the 'simple' configuration (no stemming, no stop words: any language's words match)
over `search_text()` of the item's text, computed here for stored text and queries alike: NFKC,
case-folded, CJK characters split apart (those scripts put no spaces between words). The original text
is kept for display. Hybrid search fuses the vector list and the text list by reciprocal rank
(1/(60 + rank), each list cut to `candidates`) in one SQL statement.

Failures come out typed: a server that cannot be reached is Unavailable ("the catalog at ... is not
reachable: ..."), a bad item or query InvalidArgument naming the field, a catalog built by another
model FailedPrecondition. Every call is bounded: waiting for a connection by `connect_timeout`, each
statement by the server's statement_timeout, the whole call by `timeout`.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector_async
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from shelfsight.catalog import schema
from shelfsight.catalog.schema import CatalogSettings, Item, check_filters, check_ids, check_item, check_vector
from shelfsight.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, ShelfsightError,
                               Unavailable)

__all__ = ["CatalogInfo", "CatalogSettings", "CatalogStore", "Hit", "Item", "search_text"]

MAX_QUERY_CHARS = 4096

# Hangul jamo, CJK radicals, kana, bopomofo, CJK ideographs (with extensions A-G and compatibility
# forms), Hangul syllables: scripts written without spaces between words (Korean often with, but its
# particles attach to the word).
_CJK = re.compile("([\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u318f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                  "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f])")


def search_text(s: str) -> str:
    """The text full-text search indexes and queries: NFKC (full-width 'ＡＢＣ' is 'abc'), case-folded,
    and a space either side of each Han, kana and Hangul character, so that 'simple' makes each a word
    ('手机壳' -> ' 手  机  壳 ': a query '手机' then finds it, and ranks adjacent characters higher)."""
    return _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", s).casefold())


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # vector: the inner product; text: ts_rank_cd; both: the fused reciprocal-rank score
    vector_score: float | None  # the inner product, when the item was in the vector list
    text_score: float | None  # ts_rank_cd, when the item was in the text list
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CatalogInfo:
    model_id: str
    dim: int
    items: int


class CatalogStore:
    def __init__(self, settings: CatalogSettings):
        schema.check_name(settings.name)
        self.settings = settings
        self.tables = schema.Tables(settings.name)
        self.model_id: str | None = None
        self.dim: int | None = None
        self._pool: AsyncConnectionPool | None = None
        url = conninfo_to_dict(settings.url)
        self._url_options = url.get("options", "")  # kept: the URL may carry server settings of its own
        # never the password: this goes into messages
        self.where = f"{url.get('host', 'localhost')}:{url.get('port', 5432)}/{url.get('dbname', '')} " \
                     f"(catalog {settings.name!r})"

    # ---- opening: the schema, then the pool ----

    def _connection_kwargs(self, statement_timeout: float) -> dict[str, Any]:
        # autocommit: a read is one statement; writes and searches open their own transactions.
        # libpq's connect_timeout counts whole seconds, at least 2; the pool's wait bounds it more finely.
        return {"autocommit": True, "connect_timeout": max(2, math.ceil(self.settings.connect_timeout)),
                "options": f"{self._url_options} -c statement_timeout={int(statement_timeout * 1000)}".strip(),
                "application_name": f"shelfsight-catalog-{self.settings.name}"}

    async def open(self, model_id: str, dim: int) -> "CatalogStore":
        """Create or upgrade the schema, check that `model_id`/`dim` built this catalog (or record them
        when it is new), then open the connection pool."""
        schema.check_model(model_id, dim)
        if self._pool is not None:
            raise FailedPrecondition(f"the catalog store for {self.where} is already open")
        async with self._failures("opening the catalog", self.settings.migration_timeout):
            conn = await psycopg.AsyncConnection.connect(self.settings.url,
                                                         **self._connection_kwargs(self.settings.migration_timeout))
            async with conn:
                await schema.migrate(conn, self.tables, self.settings, model_id, dim)
        self.model_id, self.dim = model_id, dim
        # check: a connection the server dropped (restart, kill) is replaced before use, not failed with.
        # reconnect_timeout: the pool's background reconnection backs off exponentially until it gives up;
        # giving up at once lets the next call connect afresh (a restart after a 12 s outage was picked up
        # in 0.02 s this way, 2.7 s with the default 300 s).
        pool = AsyncConnectionPool(self.settings.url, kwargs=self._connection_kwargs(self.settings.timeout),
                                   min_size=1, max_size=self.settings.pool_size, open=False,
                                   configure=register_vector_async, check=AsyncConnectionPool.check_connection,
                                   timeout=self.settings.connect_timeout,
                                   reconnect_timeout=self.settings.connect_timeout,
                                   name=f"catalog-{self.settings.name}")
        async with self._failures("opening the catalog"):
            try:
                await pool.open(wait=True, timeout=self.settings.connect_timeout)
            except BaseException:
                await pool.close()
                raise
        self._pool = pool
        return self

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def drop(self) -> None:
        """Remove this catalog (its tables and schema record); other catalogs in the database stay."""
        async with self._failures("dropping the catalog", self.settings.migration_timeout):
            conn = await psycopg.AsyncConnection.connect(self.settings.url,
                                                         **self._connection_kwargs(self.settings.migration_timeout))
            async with conn:
                await schema.drop(conn, self.tables)

    # ---- every call: a bounded wait for a connection, a bounded call, typed failures ----

    @contextlib.asynccontextmanager
    async def _failures(self, what: str, limit: float | None = None) -> AsyncIterator[None]:
        limit = limit or self.settings.timeout
        try:
            async with asyncio.timeout(limit + self.settings.connect_timeout):
                yield
        except ShelfsightError:
            raise
        except PoolClosed:
            raise FailedPrecondition(f"the catalog store for {self.where} is closed") from None
        except PoolTimeout:
            raise Unavailable(f"the catalog at {self.where} is not reachable: no connection within "
                              f"{self.settings.connect_timeout:g}s") from None
        except psycopg.errors.QueryCanceled:
            raise DeadlineExceeded(f"the catalog at {self.where} did not finish {what} within {limit:g}s") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise Unavailable(f"the catalog at {self.where} is not reachable: {str(e).strip()}") from None
        except TimeoutError:
            raise Unavailable(f"the catalog at {self.where} is not reachable: no answer to {what} within "
                              f"{limit + self.settings.connect_timeout:g}s") from None
        except psycopg.DataError as e:
            raise InvalidArgument(f"the catalog refused {what}: {str(e).strip()}") from None
        except psycopg.Error as e:
            raise Internal(f"the catalog at {self.where} failed {what}: {str(e).strip()}") from None

    def _open_dim(self) -> int:
        if self._pool is None or self.dim is None:
            raise FailedPrecondition("the catalog store is not open: call open(model_id, dim) first")
        return self.dim

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[psycopg.AsyncConnection]:
        self._open_dim()
        async with self._failures(what):
            async with self._pool.connection() as conn:
                yield conn

    # ---- writing ----

    async def upsert(self, items: Sequence[Item]) -> None:
        """Insert or replace `items`, all in one transaction (all or none)."""
        dim = self._open_dim()
        rows = [check_item(i, item, dim, self.settings) for i, item in enumerate(items)]
        if not rows:
            return
        if len(rows) > schema.MAX_BATCH:
            raise InvalidArgument(f"items: at most {schema.MAX_BATCH} in one upsert, got {len(rows)}")
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise InvalidArgument(f"items: id {twice!r} appears twice in one upsert")
        params = [(id_, text, Jsonb(meta), HalfVector(vec), chash, search_text(text), thumb)
                  for id_, text, meta, vec, chash, thumb in rows]
        async with self._connection("an upsert") as conn:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(self.tables.upsert, params)  # pipelined: one round trip per batch
                await cur.execute(self.tables.bump)

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove `ids`; returns how many existed."""
        ids = check_ids(ids)
        async with self._connection("a delete") as conn:
            async with conn.transaction():
                cur = await conn.execute(self.tables.delete, (ids,))
                if cur.rowcount:
                    await conn.execute(self.tables.bump)
            return cur.rowcount

    async def hashes(self, ids: Sequence[str]) -> dict[str, str]:
        """{id: content_hash} of the `ids` the catalog holds (absent ids are left out)."""
        ids = check_ids(ids)
        async with self._connection("reading hashes") as conn:
            cur = await conn.execute(self.tables.hashes, (ids,))
            return dict(await cur.fetchall())

    # ---- reading ----

    async def version(self) -> int:
        """Grows with every write (upsert, delete): what cached search results are keyed on."""
        async with self._connection("reading the version") as conn:
            return (await (await conn.execute(self.tables.version)).fetchone())[0]

    async def thumbnails(self, ids: Sequence[str]) -> dict[str, bytes]:
        """{id: thumbnail JPEG} of the `ids` the catalog holds with a thumbnail."""
        ids = check_ids(ids)
        async with self._connection("reading thumbnails") as conn:
            cur = await conn.execute(self.tables.thumbnails, (ids,))
            return {id_: bytes(t) for id_, t in await cur.fetchall() if t}

    async def count(self) -> int:
        async with self._connection("counting") as conn:
            return (await (await conn.execute(self.tables.count)).fetchone())[0]

    async def info(self) -> CatalogInfo:
        return CatalogInfo(self.model_id, self.dim, await self.count())

    async def search(self, vector: Sequence[float] | np.ndarray | None = None, text: str | None = None,
                     top_k: int = 10, filters: Mapping[str, Any] | None = None, candidates: int = 100) -> list[Hit]:
        """The `top_k` best items for a vector, a text, or both (fused). `filters`: metadata keys that must
        equal the given values. `candidates`: how many each list considers (HNSW's ef_search, at least top_k)."""
        q = check_vector("vector", vector, self._open_dim()) if vector is not None else None
        if text is not None and not isinstance(text, str):
            raise InvalidArgument(f"text must be a string, got {type(text).__name__}")
        if text is not None and len(text) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"text: at most {MAX_QUERY_CHARS} characters, got {len(text)}")
        words = search_text(text).strip() if text else ""
        if q is None and not words:
            raise InvalidArgument("a search needs a vector, a text, or both")
        for name, value, top in (("top_k", top_k, 1000), ("candidates", candidates, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise InvalidArgument(f"{name} must be an integer in 1..{top}, got {value!r}")
        where = check_filters(filters)
        params = {"q": HalfVector(q) if q is not None else None, "t": words, "k": top_k,
                  "c": max(candidates, top_k), "f": Jsonb(where) if where else None}
        statement = self.tables.search(vector=q is not None, text=bool(words), filtered=bool(where))
        async with self._connection("a search") as conn:
            async with conn.transaction():
                if q is not None:
                    # ef_search: HNSW's candidate list; iterative scan: keep walking the graph while a
                    # filter discards rows, so a selective filter still yields k (SET LOCAL: this query only)
                    await conn.execute("SELECT set_config('hnsw.ef_search', %s, true), "
                                       "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                                       (str(params["c"]),))
                cur = await conn.execute(statement, params)
                rows = await cur.fetchall()
        return [Hit(id_, float(score), _float(vs), _float(ts), body, meta) for id_, score, vs, ts, body, meta in rows]


def _float(x: Any) -> float | None:
    return None if x is None else float(x)
