"""TLS for the gateway's faces: a certificate and key (`--tls-cert`, `--tls-key`), and optionally the CA
that client certificates must chain to (`--tls-client-ca`: mutual TLS, a client without a valid
certificate is refused in the handshake).

The files are read again when they change, without a restart: gRPC asks `fetch()` before each new
handshake (a cheap stat), the HTTP face's SSL context is reloaded by `CertFiles.watch` (every few
seconds, and at SIGHUP). A certificate renewed by cert-manager or an ACME client is in use for the next
connection; connections already open keep theirs.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from shelfsight.errors import InvalidArgument

log = logging.getLogger("shelfsight.gateway")


@dataclass(frozen=True)
class TLSSettings:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # mutual TLS: client certificates required and verified against it

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def check(self) -> "TLSSettings":
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        if self.client_ca is not None and self.cert is None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidArgument(f"--tls-{name.replace('_', '-')} {path} is not a file")
        return self


class CertFiles:
    """The files behind TLS, and whether they changed since they were last read."""

    def __init__(self, tls: TLSSettings):
        self.tls = tls.check()
        self._seen = self._stamp()

    def _paths(self) -> list[Path]:
        return [Path(p) for p in (self.tls.cert, self.tls.key, self.tls.client_ca) if p is not None]

    def _stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in self._paths())

    def changed(self) -> bool:
        try:
            now = self._stamp()
        except OSError:
            return False  # mid-rename by a renewal: the next look sees the new files
        if now != self._seen:
            self._seen = now
            return True
        return False

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.tls.client_ca).read_bytes() if self.tls.client_ca else None
        return Path(self.tls.key).read_bytes(), Path(self.tls.cert).read_bytes(), ca

    # ---- gRPC ----
    def grpc_credentials(self) -> grpc.ServerCredentials:
        def config():
            key, cert, ca = self._read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch():  # gRPC asks before each new handshake; None: keep what it has
            if not self.changed():
                return None
            try:
                fresh = config()
            except OSError as e:
                log.error("TLS files changed but cannot be read (%s); keeping the previous ones", e)
                return None
            log.info("TLS certificate reloaded for new gRPC connections")
            return fresh

        return grpc.dynamic_ssl_server_credentials(config(), fetch,
                                                   require_client_authentication=self.tls.client_ca is not None)

    # ---- HTTP (uvicorn) ----
    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        if self.tls.client_ca is not None:
            ctx.load_verify_locations(str(self.tls.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED

    def reload(self, ctx: ssl.SSLContext) -> None:
        """New handshakes on `ctx` use the files as they are now."""
        try:
            self._load(ctx)
            log.info("TLS certificate reloaded for new HTTP connections")
        except (OSError, ssl.SSLError) as e:
            log.error("TLS files cannot be loaded (%s); keeping the previous ones", e)
