"""What the catalog stores and how: its settings, the checks an item or query passes before it reaches
SQL (pure: each failure names the field), the tables' statements, and the ordered migrations.

The schema is the project's, versioned per catalog in `shelfsight_catalog_schema`. `migrate()` runs in
one transaction under a transaction-scoped advisory lock, so gateways starting at once apply each
migration once (the second waits, then finds them applied); each migration's DDL is also idempotent.
Migrations are only ever appended: a catalog remembers the versions it has.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import psycopg
from psycopg import sql

from shelfsight.errors import FailedPrecondition, InvalidArgument

MAX_DIM = 4000  # pgvector's HNSW limit for halfvec
HALF_MAX = 65504.0  # the largest finite float16: halfvec's range
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 16384
MAX_KEY_CHARS = 128
MAX_BATCH = 1000  # items per upsert, ids per delete or hashes call: one call stays within its timeout
MIGRATION_LOCK = 0x5e1f5167  # pg_advisory_xact_lock key: "shelfsight catalog schema", any fixed number
SCHEMA_TABLE = "shelfsight_catalog_schema"
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009): damps the weight of the first ranks
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")  # prefixes table names: lower case needs no quoting anywhere


@dataclass(frozen=True)
class CatalogSettings:
    url: str  # a postgresql:// URL (EmbeddedPostgres.url, or any PostgreSQL with pgvector >= 0.8)
    name: str = "catalog"
    pool_size: int = 4
    connect_timeout: float = 5.0  # opening, and each wait for a connection: a dead server fails this fast
    timeout: float = 30.0  # each statement (the server's statement_timeout) and each whole call
    migration_timeout: float = 300.0  # open() and drop(): waiting for another process's migration included
    hnsw_m: int = 16  # HNSW graph degree; these two apply when the index is built (a new catalog)
    hnsw_ef_construction: int = 64
    max_metadata_bytes: int = 8192  # an item's metadata as JSON


@dataclass(frozen=True)
class Item:
    id: str  # 1..256 characters
    text: str  # title and attributes, may be empty
    metadata: Mapping[str, Any]  # flat: str, int, float or bool values
    embedding: Sequence[float]  # `dim` finite values, L2-normalised by the embedding model
    content_hash: str = ""  # the caller's hash of photo bytes + text + metadata: unchanged items are skipped
    thumbnail: bytes = b""  # a small JPEG of the item's photo (search results show it; the reranker reads it)


# ---- checks ----

def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"name must be 1-40 lower-case letters, digits or _, starting with a letter; "
                              f"got {name!r}")


def check_model(model_id: str, dim: int) -> None:
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= MAX_ID_CHARS:
        raise InvalidArgument(f"model_id must be 1..{MAX_ID_CHARS} characters, got {model_id!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidArgument(f"dim must be an integer in 1..{MAX_DIM} (HNSW over halfvec), got {dim!r}")


def _check_string(field: str, value: Any, low: int, high: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise InvalidArgument(f"{field} must be {low}..{high} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(f"{field} holds a NUL character, which PostgreSQL text cannot store")
    return value


def check_vector(field: str, values: Any, dim: int) -> np.ndarray:
    try:
        vec = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{field} must be a sequence of {dim} numbers") from None
    if vec.ndim != 1 or len(vec) != dim:
        raise InvalidArgument(f"{field} has shape {vec.shape}; the catalog's embeddings have {dim} values")
    if not np.isfinite(vec).all():
        raise InvalidArgument(f"{field} holds a NaN or infinite value (at {int(np.flatnonzero(~np.isfinite(vec))[0])})")
    if np.abs(vec).max(initial=0.0) > HALF_MAX:
        raise InvalidArgument(f"{field} holds a value beyond float16's range (±{HALF_MAX:g}), which halfvec stores")
    return vec


def _check_scalar(field: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{field} must be finite, got {value!r}")
    if isinstance(value, str):
        _check_string(field, value, 0, MAX_TEXT_CHARS)
    elif not isinstance(value, (bool, int, float)):
        raise InvalidArgument(f"{field} must be a str, int, float or bool, got {type(value).__name__}")


def _check_mapping(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{field} must be a mapping of names to values, got {type(value).__name__}")
    for key, v in value.items():
        _check_string(f"{field} key {key!r}", key, 1, MAX_KEY_CHARS)
        _check_scalar(f"{field}[{key!r}]", v)
    return dict(value)


MAX_THUMBNAIL_BYTES = 256 << 10


def check_item(i: int, item: Item, dim: int, settings: CatalogSettings) -> tuple[str, str, dict, np.ndarray, str, bytes]:
    """(id, text, metadata, embedding, content_hash, thumbnail) of items[i], or InvalidArgument naming the field."""
    field = f"items[{i}]"
    if not isinstance(item, Item):
        raise InvalidArgument(f"{field} must be an Item, got {type(item).__name__}")
    id_ = _check_string(f"{field}.id", item.id, 1, MAX_ID_CHARS)
    text = _check_string(f"{field}.text", item.text, 0, MAX_TEXT_CHARS)
    metadata = _check_mapping(f"{field}.metadata", item.metadata)
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > settings.max_metadata_bytes:
        raise InvalidArgument(f"{field}.metadata is {size} bytes as JSON; at most {settings.max_metadata_bytes}")
    embedding = check_vector(f"{field}.embedding", item.embedding, dim)
    content_hash = _check_string(f"{field}.content_hash", item.content_hash, 0, MAX_ID_CHARS)
    if not isinstance(item.thumbnail, bytes) or len(item.thumbnail) > MAX_THUMBNAIL_BYTES:
        raise InvalidArgument(f"{field}.thumbnail must be at most {MAX_THUMBNAIL_BYTES} bytes")
    return id_, text, metadata, embedding, content_hash, item.thumbnail


def check_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str) or not isinstance(ids, (Sequence, set, frozenset)):
        raise InvalidArgument(f"ids must be a list of ids, got {type(ids).__name__}")
    if len(ids) > MAX_BATCH:
        raise InvalidArgument(f"ids: at most {MAX_BATCH} in one call, got {len(ids)}")
    return list(dict.fromkeys(_check_string(f"ids[{i}]", x, 1, MAX_ID_CHARS) for i, x in enumerate(ids)))


def check_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if filters is None else _check_mapping("filters", filters)


# ---- statements ----

class Tables:
    """The statements over one catalog's tables (`name`_items, `name`_meta)."""

    def __init__(self, name: str):
        self.name = name
        self.items, self.meta = sql.Identifier(f"{name}_items"), sql.Identifier(f"{name}_meta")
        f = {"items": self.items}
        self.upsert = sql.SQL(
            "INSERT INTO {items} (id, text, metadata, embedding, content_hash, tsv, thumbnail, updated_at) "
            "VALUES (%s, %s, %s, %b, %s, to_tsvector('simple', %s), %s, now()) "
            "ON CONFLICT (id) DO UPDATE SET text = EXCLUDED.text, metadata = EXCLUDED.metadata, "
            "embedding = EXCLUDED.embedding, content_hash = EXCLUDED.content_hash, tsv = EXCLUDED.tsv, "
            "thumbnail = EXCLUDED.thumbnail, updated_at = EXCLUDED.updated_at").format(**f)
        # every write bumps the catalog's version (in its transaction): cached search results carry the
        # version they were computed at, so any write makes them misses, on every gateway
        self.bump = sql.SQL("UPDATE {meta} SET version = version + 1").format(meta=self.meta)
        self.version = sql.SQL("SELECT version FROM {meta}").format(meta=self.meta)
        self.thumbnails = sql.SQL("SELECT id, thumbnail FROM {items} WHERE id = ANY(%s)").format(**f)
        self.delete = sql.SQL("DELETE FROM {items} WHERE id = ANY(%s)").format(**f)
        self.hashes = sql.SQL("SELECT id, content_hash FROM {items} WHERE id = ANY(%s)").format(**f)
        self.count = sql.SQL("SELECT count(*) FROM {items}").format(**f)

    def search(self, vector: bool, text: bool, filtered: bool) -> sql.Composed:
        """Rows (id, score, vector_score, text_score, text, metadata), best first. Parameters: q (halfvec),
        t (search_text of the query), k (top_k), c (candidates per list), f (jsonb the metadata contains)."""
        if vector and text:
            statement, limit = _FUSED, "%(c)s"  # each list cut to `candidates`, the fused one to top_k
        else:
            statement, limit = (_NEAREST if vector else _MATCHING), "%(k)s"
        parts = {"items": self.items, "limit": sql.SQL(limit),
                 "where": sql.SQL("WHERE metadata @> %(f)s" if filtered else ""),
                 "also": sql.SQL("AND metadata @> %(f)s" if filtered else "")}
        return sql.SQL(statement).format(items=self.items, rrf=sql.Literal(RRF_K),
                                         nearest=sql.SQL(_BY_VECTOR).format(**parts),
                                         matching=sql.SQL(_BY_TEXT).format(**parts))


# The two ranked lists: HNSW's order (<#>: the negative inner product, ascending), and full-text matches.
_BY_VECTOR = "SELECT id, embedding <#> %(q)b AS distance FROM {items} {where} ORDER BY distance LIMIT {limit}"
_BY_TEXT = """SELECT id, ts_rank_cd(tsv, query)::float8 AS score
    FROM {items}, websearch_to_tsquery('simple', %(t)s) AS query
    WHERE tsv @@ query {also} ORDER BY score DESC, id LIMIT {limit}"""
# relaxed_order (the iterative scan) may hand rows over slightly out of order: the k are sorted again
_NEAREST = """WITH nearest AS MATERIALIZED ({nearest})
    SELECT i.id, -n.distance, -n.distance, NULL::float8, i.text, i.metadata
    FROM nearest n JOIN {items} i USING (id) ORDER BY n.distance, i.id"""
_MATCHING = """WITH matching AS ({matching})
    SELECT i.id, m.score, NULL::float8, m.score, i.text, i.metadata
    FROM matching m JOIN {items} i USING (id) ORDER BY m.score DESC, i.id"""
_FUSED = """WITH
    by_vector AS (SELECT id, -distance AS score, row_number() OVER (ORDER BY distance, id) AS rank
                  FROM ({nearest}) AS n),
    by_text AS (SELECT id, score, row_number() OVER (ORDER BY score DESC, id) AS rank FROM ({matching}) AS m),
    fused AS (SELECT coalesce(v.id, t.id) AS id,
                     coalesce(1.0 / ({rrf} + v.rank), 0) + coalesce(1.0 / ({rrf} + t.rank), 0) AS score,
                     v.score AS vector_score, t.score AS text_score
              FROM by_vector v FULL OUTER JOIN by_text t ON v.id = t.id)
    SELECT f.id, f.score::float8, f.vector_score::float8, f.text_score, i.text, i.metadata
    FROM fused f JOIN {items} i USING (id) ORDER BY f.score DESC, f.id LIMIT %(k)s"""


# ---- migrations: (tables, dim, settings) -> statements; append only ----

def _tables(t: Tables, dim: int, s: CatalogSettings) -> list[sql.Composable]:
    return [
        sql.SQL("CREATE TABLE IF NOT EXISTS {meta} ("
                "one boolean PRIMARY KEY DEFAULT true CHECK (one), "  # at most one row
                "model_id text NOT NULL, dim integer NOT NULL, created timestamptz NOT NULL DEFAULT now())"
                ).format(meta=t.meta),
        sql.SQL("CREATE TABLE IF NOT EXISTS {items} ("
                "id text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND {max_id}), "
                "text text NOT NULL DEFAULT '', "
                "metadata jsonb NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(metadata) = 'object'), "
                "embedding halfvec({dim}) NOT NULL, "
                "content_hash text NOT NULL DEFAULT '', "
                "tsv tsvector NOT NULL, "  # to_tsvector('simple', search_text(text)), written with the row
                "updated_at timestamptz NOT NULL DEFAULT now())"
                ).format(items=t.items, dim=sql.Literal(dim), max_id=sql.Literal(MAX_ID_CHARS)),
    ]


def _indexes(t: Tables, dim: int, s: CatalogSettings) -> list[sql.Composable]:
    index = lambda what: sql.Identifier(f"{t.name}_items_{what}")  # noqa: E731
    return [
        sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {items} USING hnsw (embedding halfvec_ip_ops) "
                "WITH (m = {m}, ef_construction = {efc})").format(
            name=index("embedding"), items=t.items, m=sql.Literal(s.hnsw_m), efc=sql.Literal(s.hnsw_ef_construction)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {items} USING gin (tsv)").format(
            name=index("tsv"), items=t.items),
        sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {items} USING gin (metadata jsonb_path_ops)").format(
            name=index("metadata"), items=t.items),
    ]


def _thumbnails_and_version(t: Tables, dim: int, s: CatalogSettings) -> list[sql.Composable]:
    return [
        sql.SQL("ALTER TABLE {items} ADD COLUMN IF NOT EXISTS thumbnail bytea NOT NULL DEFAULT ''").format(items=t.items),
        sql.SQL("ALTER TABLE {meta} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0").format(meta=t.meta),
    ]


MIGRATIONS: list[Callable[[Tables, int, CatalogSettings], list[sql.Composable]]] = [_tables, _indexes,
                                                                                     _thumbnails_and_version]


async def _built_by(conn: psycopg.AsyncConnection, t: Tables) -> tuple[str, int] | None:
    exists = (await (await conn.execute("SELECT to_regclass(%s)", (f"{t.name}_meta",))).fetchone())[0]
    if exists is None:
        return None
    return await (await conn.execute(sql.SQL("SELECT model_id, dim FROM {meta}").format(meta=t.meta))).fetchone()


async def migrate(conn: psycopg.AsyncConnection, t: Tables, s: CatalogSettings, model_id: str, dim: int) -> None:
    """Bring catalog `t` to the newest schema; record `model_id`/`dim` if it is new, refuse others if not."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))  # released at commit
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (catalog text NOT NULL, version integer NOT NULL, "
                                   "applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (catalog, version))"
                                   ).format(sql.Identifier(SCHEMA_TABLE)))
        built = await _built_by(conn, t)
        if built is not None and tuple(built) != (model_id, dim):
            raise FailedPrecondition(
                f"catalog {t.name!r} was built with model {built[0]!r} ({built[1]}-d embeddings), not {model_id!r} "
                f"({dim}-d): index into another catalog name, or drop this one (CatalogStore.drop()) and index again")
        cur = await conn.execute(sql.SQL("SELECT version FROM {} WHERE catalog = %s").format(
            sql.Identifier(SCHEMA_TABLE)), (t.name,))
        applied = {v for (v,) in await cur.fetchall()}
        if applied and max(applied) > len(MIGRATIONS):
            raise FailedPrecondition(f"catalog {t.name!r} has schema version {max(applied)}; this shelfsight knows "
                                     f"{len(MIGRATIONS)}: upgrade shelfsight")
        for version, migration in enumerate(MIGRATIONS, 1):
            if version in applied:
                continue
            for statement in migration(t, dim, s):
                await conn.execute(statement)
            await conn.execute(sql.SQL("INSERT INTO {} (catalog, version) VALUES (%s, %s)").format(
                sql.Identifier(SCHEMA_TABLE)), (t.name, version))
        if built is None:
            await conn.execute(sql.SQL("INSERT INTO {meta} (model_id, dim) VALUES (%s, %s)").format(meta=t.meta),
                               (model_id, dim))


async def drop(conn: psycopg.AsyncConnection, t: Tables) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(sql.SQL("DROP TABLE IF EXISTS {items}, {meta}").format(items=t.items, meta=t.meta))
        if (await (await conn.execute("SELECT to_regclass(%s)", (SCHEMA_TABLE,))).fetchone())[0] is not None:
            await conn.execute(sql.SQL("DELETE FROM {} WHERE catalog = %s").format(sql.Identifier(SCHEMA_TABLE)),
                               (t.name,))
