"""`shelfsight gateway`: the gRPC front door alone, in front of running Tritons. Its flags are shared
with `shelfsight serve` (app/serve.py)."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

CATALOG_ENV = "SHELFSIGHT_CATALOG_URL"


def add_gateway_flags(p) -> None:
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings, SearchSettings

    s, cache, search = GatewaySettings(), CacheSettings(), SearchSettings()
    p.add_argument("--host", default=s.host, help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--metrics-port", type=int, default=s.metrics_port)
    p.add_argument("--max-in-flight", type=int, default=s.max_in_flight,
                   help="model calls at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--cache-mb", type=int, default=cache.max_bytes >> 20)
    p.add_argument("--cache-ttl", type=float, default=cache.ttl_seconds, help="seconds")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-perceptual", action="store_true")
    p.add_argument("--phash-bits", type=int, choices=(64, 256), default=cache.phash_bits)
    p.add_argument("--max-distance", type=int, default=cache.max_distance,
                   help="pHash bits that may differ for a perceptual candidate")
    p.add_argument("--max-colour-distance", type=float, default=cache.max_colour_distance,
                   help="and how far the 4x4 colour thumbnails may differ (mean, 0..255)")
    p.add_argument("--max-difference", type=float, default=cache.max_difference,
                   help="a candidate is served when no pixel of its 512 px thumbnail disagrees more (see likeness.difference)")
    p.add_argument("--no-cache-sampled", dest="cache_sampled", action="store_false",
                   help="cache only greedy and seeded answers, not sampled ones (temperature>0, no seed: "
                        "the serving defaults; cached by default, REFRESH gives a fresh draw)")
    p.add_argument("--redis", help="redis://HOST:PORT/DB: a cache shared by several gateways")
    p.add_argument("--redis-timeout", type=float, default=cache.redis_timeout,
                   help="seconds one Redis operation may take; past it the request goes on without the cache")
    p.add_argument("--redis-retry", type=float, default=cache.redis_retry,
                   help="seconds between probes of a Redis that failed (requests skip it meanwhile)")
    p.add_argument("--catalog", metavar="URL", default=os.environ.get(CATALOG_ENV) or None,
                   help=f"postgresql://... (with pgvector): the catalog that Search and Index use (default: "
                        f"${CATALOG_ENV}, which keeps its password out of the process list; `serve` starts a "
                        "catalog of its own when it serves an embedding model)")
    p.add_argument("--catalog-name", default=search.catalog_name, help="one database may hold several catalogs")
    p.add_argument("--query-instruction", default=search.query_instruction,
                   help="the instruction search queries are embedded with (catalog items get the model's default)")
    p.add_argument("--http-port", type=int, default=s.http_port,
                   help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/embeddings, /v1/models) "
                        "on this port, on --host (0: any free port; off when not given)")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image_url pictures in HTTP requests (public addresses only, size and time "
                        "bounded); without it only data: URLs are taken")
    p.add_argument("--tls-cert", type=Path, help="the gateway's TLS certificate (PEM): TLS on gRPC and HTTP")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="mutual TLS: clients must present a certificate signed by this CA")
    p.add_argument("--api-keys", type=Path, help="the API keys file (`shelfsight keys add NAME --file FILE`): calls "
                   "must carry `authorization: Bearer <key>`; reloaded when it changes")
    p.add_argument("--cache-scope", choices=("shared", "client"), default=s.cache_scope,
                   help="client: every cached answer and search result is keyed by the calling client too "
                        "(needs --api-keys): a cache hit's speed then tells a client nothing of the others")
    p.add_argument("--shutdown-grace", type=float, default=s.shutdown_grace,
                   help="seconds in-flight requests get to finish on SIGTERM (longer than the longest answer)")


def settings_from(args, triton_url: str, catalog_url: str | None = None):
    from shelfsight.gateway.settings import CacheSettings, GatewaySettings, SearchSettings

    return GatewaySettings(
        triton_url=triton_url, triton_dns=getattr(args, "triton_dns", None), host=args.host, port=args.port, metrics_host=args.host, metrics_port=args.metrics_port,
        max_in_flight=args.max_in_flight, shutdown_grace=args.shutdown_grace, http_port=args.http_port,
        allow_image_urls=args.allow_image_urls, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, api_keys=args.api_keys, cache_scope=args.cache_scope,
        cache=CacheSettings(enabled=not args.no_cache, max_bytes=args.cache_mb << 20, ttl_seconds=args.cache_ttl,
                            perceptual=not args.no_perceptual, phash_bits=args.phash_bits,
                            max_distance=args.max_distance, max_colour_distance=args.max_colour_distance,
                            max_difference=args.max_difference,
                            cache_sampled=args.cache_sampled, redis_url=args.redis,
                            redis_timeout=args.redis_timeout, redis_retry=args.redis_retry),
        search=SearchSettings(catalog_url=catalog_url or args.catalog, catalog_name=args.catalog_name,
                              query_instruction=args.query_instruction))


def register(sub) -> None:
    from shelfsight.gateway.settings import GatewaySettings

    g = sub.add_parser("gateway", help="run the gRPC gateway in front of a running Triton")
    to = g.add_mutually_exclusive_group()
    to.add_argument("--triton", default=GatewaySettings.triton_url,
                    help="Triton gRPC HOST:PORT, or several comma-separated (one per replica)")
    to.add_argument("--triton-dns", metavar="NAME:PORT",
                    help="re-resolve NAME every few seconds; each address is a replica (a headless Service)")
    add_gateway_flags(g)
    g.set_defaults(func=cmd_gateway)

    keys = sub.add_parser("keys", help="API keys for the gateway: add (prints the new key once), revoke, list")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=type(keys))
    add = ksub.add_parser("add", help="make a key for a client; only its hash is stored")
    add.add_argument("name")
    add.add_argument("--file", type=Path, required=True, help="the keys file (created if missing)")
    add.add_argument("--rights", default="answer,search", help="comma-separated: answer, search, index")
    add.add_argument("--rps", type=float, default=0.0, help="requests per second (0: no limit of its own)")
    add.add_argument("--burst", type=float, default=0.0, help="requests let through at once (default: --rps)")
    add.add_argument("--concurrency", type=int, default=0, help="requests in flight (0: no limit of its own)")
    add.set_defaults(func=cmd_keys_add)
    revoke = ksub.add_parser("revoke", help="remove a client's key (a running gateway stops taking it within a second)")
    revoke.add_argument("name")
    revoke.add_argument("--file", type=Path, required=True)
    revoke.set_defaults(func=cmd_keys_revoke)
    ls = ksub.add_parser("list", help="the clients and their rights and limits (never keys)")
    ls.add_argument("--file", type=Path, required=True)
    ls.set_defaults(func=cmd_keys_list)


def cmd_keys_add(args) -> int:
    from shelfsight.errors import AlreadyExists, InvalidArgument
    from shelfsight.gateway.auth import RIGHTS, ClientKey, hash_key, new_key, read_keys, write_keys

    keys = read_keys(args.file)
    if any(k.name == args.name for k in keys):
        raise AlreadyExists(f"{args.file} already has a client named {args.name!r} (revoke it first)")
    rights = tuple(r.strip() for r in args.rights.split(",") if r.strip())
    if not rights or set(rights) - set(RIGHTS):
        raise InvalidArgument(f"--rights must be among {', '.join(RIGHTS)}, got {args.rights!r}")
    if args.rps < 0 or args.burst < 0 or args.concurrency < 0:
        raise InvalidArgument("--rps, --burst and --concurrency must not be negative")
    key = new_key()
    write_keys(args.file, keys + [ClientKey(args.name, hash_key(key), rights, args.rps, args.burst, args.concurrency)])
    print(key)
    print(f"the key of {args.name!r} (shown once; {args.file} keeps only its hash)", file=sys.stderr)
    return 0


def cmd_keys_revoke(args) -> int:
    from shelfsight.errors import NotFound
    from shelfsight.gateway.auth import read_keys, write_keys

    keys = read_keys(args.file)
    if not any(k.name == args.name for k in keys):
        raise NotFound(f"{args.file} has no client named {args.name!r}")
    write_keys(args.file, [k for k in keys if k.name != args.name])
    print(f"revoked {args.name!r}", file=sys.stderr)
    return 0


def cmd_keys_list(args) -> int:
    import json

    from shelfsight.gateway.auth import read_keys

    for k in read_keys(args.file):
        print(json.dumps({"name": k.name, "rights": list(k.rights), "rps": k.rps, "burst": k.burst,
                          "concurrency": k.concurrency}))
    return 0


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def cmd_gateway(args) -> int:
    from shelfsight.gateway.server import serve_forever

    configure_logging()
    settings = settings_from(args, args.triton)
    asyncio.run(serve_forever(settings, ready=lambda gw: print(
        f"gateway ready on {settings.host}:{gw.port} (metrics :{gw.metrics_port}"
        + (f", OpenAI HTTP http://{settings.host}:{gw.http_port}/v1" if gw.http_port else "") + ")", flush=True)))
    return 0
