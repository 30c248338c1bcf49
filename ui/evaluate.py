"""The Evaluate tab's logic, free of Gradio: run `shelfsight eval` on a dataset folder into the UI's
work folder, follow its progress, show report.md, and put two runs side by side (`eval compare`)."""
from __future__ import annotations

import time
from pathlib import Path

from shelfsight.errors import InvalidArgument, NotFound
from shelfsight.evaluation import dataset, run
from shelfsight.ui.batch import Background


def runs_root(workdir: Path) -> Path:
    return workdir / "eval"


def start(data_dir: str, target: str, workdir: Path, max_new_tokens: int | None = None, concurrency: int = 4,
          timeout: float | None = None) -> tuple[Background, Path, int]:
    """Check the dataset, then start scoring it. Returns (job, run folder, number of images)."""
    if not data_dir or not data_dir.strip():
        raise InvalidArgument("name a dataset folder (one with manifest.jsonl, e.g. from `shelfsight dataset synth`)")
    folder = Path(data_dir.strip()).expanduser()
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a folder")
    items = dataset.load(folder)  # names what is wrong with the manifest before anything is asked
    stem = runs_root(workdir) / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():  # two runs in one second: a fresh folder each, never a resumed one
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    out.mkdir(parents=True)
    job = Background(lambda: run.run(folder, target, out, concurrency=concurrency, progress=False,
                                     timeout=timeout, max_new_tokens=max_new_tokens or None))
    return job, out, len(items)


def asked(out: Path) -> int:
    """Answers recorded so far in a run folder."""
    f = out / "answers.jsonl"
    return f.read_bytes().count(b"\n") if f.exists() else 0


def report(out: Path) -> str:
    f = out / "report.md"
    if not f.exists():
        raise NotFound(f"{out.name} has no report.md yet")
    return f.read_text(encoding="utf-8")


def finished_runs(workdir: Path) -> list[str]:
    """Run folders under the work folder with a report, newest first."""
    root = runs_root(workdir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if (p / "report.json").exists()]
    return [str(p) for p in sorted(done, key=lambda p: p.stat().st_mtime, reverse=True)]


def compare(run_a: str, run_b: str) -> tuple[str, str, str]:
    """(`eval compare` table, report A, report B) for two run folders."""
    if not run_a or not run_b:
        raise InvalidArgument("pick two evaluation runs to compare")
    return run.compare(Path(run_a), Path(run_b)), report(Path(run_a)), report(Path(run_b))
