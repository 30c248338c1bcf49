"""Who may call: API keys, what each key may do, and how fast (docs/security.md).

A keys file (`--api-keys FILE`, written by `shelfsight keys add|revoke`) names each client and holds
the SHA-256 of its key - never the key - with its rights and limits:

    {"format": "shelfsight.keys/1", "clients": [
      {"name": "shop-web", "sha256": "<hex>", "rights": ["answer", "search"], "rps": 20, "burst": 40, "concurrency": 8}]}

Rights: `answer` (Recognize, RecognizeStream, chat completions), `search` (Search, Info, embeddings),
`index` (Index, Delete). A call carries `authorization: Bearer <key>` (gRPC metadata, or the HTTP header
OpenAI clients send). The presented key is hashed and compared with every client's hash in constant time
(hmac.compare_digest). The file is read again when it changes (looked at once a second, or at SIGHUP):
revoking a key takes effect without a restart. Health and reflection stay open.

Limits per client: requests per second (a token bucket: `rps` a second, up to `burst` at once) and
requests in flight (`concurrency`); over either, RESOURCE_EXHAUSTED (HTTP 429) with how long to wait.
One client at its limit is refused before any work, so it cannot slow another; the gateway's global
bound on model calls still holds for everyone.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shelfsight.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated

FORMAT = "shelfsight.keys/1"
RIGHTS = ("answer", "search", "index")
DEFAULT_RIGHTS = ("answer", "search")
# what each method needs (gRPC method names and HTTP routes)
NEEDS = {"Recognize": "answer", "RecognizeStream": "answer", "/v1/chat/completions": "answer",
         "Search": "search", "Info": "search", "/v1/embeddings": "search", "/v1/models": "answer",
         "/v1/models/{id}": "answer",
         "Index": "index", "Delete": "index"}
KEY_PREFIX = "ss-"
# The client a call runs for (its name), for the access log, metrics and a client-scoped cache.
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)


@dataclass
class ClientKey:
    name: str
    sha256: str
    rights: tuple[str, ...] = DEFAULT_RIGHTS
    rps: float = 0.0  # 0: no rate limit
    burst: float = 0.0  # tokens the bucket holds; 0: rps (one second's worth)
    concurrency: int = 0  # 0: no bound of its own


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_keys(path: Path) -> list[ClientKey]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path} is not a keys file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("clients"), list):
        raise InvalidArgument(f"{path} is not a keys file (format {FORMAT!r} with a list of clients)")
    out = []
    for i, c in enumerate(doc["clients"]):
        try:
            key = ClientKey(**{k: tuple(v) if k == "rights" else v for k, v in c.items()})
        except TypeError as e:
            raise InvalidArgument(f"{path}: clients[{i}]: {e}") from None
        bad = set(key.rights) - set(RIGHTS)
        if bad or not key.name or len(key.sha256) != 64:
            raise InvalidArgument(f"{path}: clients[{i}] needs a name, a 64-hex sha256 and rights among {RIGHTS}")
        out.append(key)
    return out


def write_keys(path: Path, keys: list[ClientKey]) -> None:
    """Atomically (write, fsync, rename), readable by its owner only: hashes are not keys, but rights are."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    doc = {"format": FORMAT, "clients": [dict(asdict(k), rights=list(k.rights)) for k in keys]}
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Bucket:
    """A token bucket: `rate` tokens a second, holding at most `size`."""

    def __init__(self, rate: float, size: float):
        self.rate, self.size = rate, size
        self.tokens, self.at = size, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(self.size, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _State:
    bucket: Bucket | None
    in_flight: int = 0
    rights: tuple[str, ...] = field(default_factory=tuple)


class KeyRing:
    """The keys file, kept current; admits or refuses each call."""

    CHECK_EVERY = 1.0  # seconds between looks at the file

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._keys: list[ClientKey] = []
        self._state: dict[str, _State] = {}
        self._seen: tuple | None = None
        self._checked = 0.0
        if self.path is not None:
            if not self.path.exists():
                raise InvalidArgument(f"--api-keys {self.path} does not exist (create it with `shelfsight keys add`)")
            self.reload()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def reload(self) -> None:
        st = self.path.stat()
        self._keys = read_keys(self.path)
        self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        state = {}
        for k in self._keys:
            old = self._state.get(k.name)
            bucket = Bucket(k.rps, k.burst or max(1.0, k.rps)) if k.rps > 0 else None
            if old is not None and old.bucket is not None and bucket is not None \
                    and (old.bucket.rate, old.bucket.size) == (bucket.rate, bucket.size):
                bucket = old.bucket  # unchanged limits keep their state across a reload
            state[k.name] = _State(bucket, old.in_flight if old else 0, k.rights)
        self._state = state
        self._checked = time.monotonic()

    def _fresh(self) -> None:
        if time.monotonic() - self._checked < self.CHECK_EVERY:
            return
        self._checked = time.monotonic()
        try:
            st = self.path.stat()
        except OSError:
            self._keys, self._state = [], {}  # the file is gone: nobody is let in
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._seen:
            self.reload()

    def identify(self, authorization: str | None) -> ClientKey:
        """The client whose key `authorization` ("Bearer <key>") carries; UNAUTHENTICATED otherwise."""
        self._fresh()
        if not authorization:
            raise Unauthenticated("this gateway needs an API key: send `authorization: Bearer <key>`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization must be `Bearer <key>`")
        presented = hash_key(key.strip())
        found = None
        for k in self._keys:  # every one compared, in constant time: no early exit
            if hmac.compare_digest(presented, k.sha256):
                found = k
        if found is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return found

    @contextlib.contextmanager
    def admit(self, authorization: str | None, method: str):
        """Authenticate, authorise and count one call against its client's limits, for its duration;
        yields the client's name (CLIENT is set to it meanwhile). Without a keys file: everyone, unnamed."""
        if not self.enabled:
            yield None
            return
        client = self.identify(authorization)
        need = NEEDS.get(method)
        if need is not None and need not in client.rights:
            raise PermissionDenied(f"the key of {client.name!r} may not {need} (it may {', '.join(client.rights)})")
        state = self._state[client.name]
        if client.concurrency and state.in_flight >= client.concurrency:
            raise ResourceExhausted(f"{client.name!r} has {state.in_flight} calls in flight (its limit); retry "
                                    "shortly", retry_after=0.1)
        if state.bucket is not None:
            wait = state.bucket.take()
            if wait > 0:
                raise ResourceExhausted(f"{client.name!r} is over its {client.rps:g} requests a second; retry in "
                                        f"{wait * 1000:.0f} ms", retry_after=wait)
        state.in_flight += 1
        token = CLIENT.set(client.name)
        try:
            yield client.name
        finally:
            CLIENT.reset(token)
            state.in_flight -= 1
