"""`shelfsight export quantize`: a Qwen3-VL checkpoint -> bf16 / int8 / int4 checkpoint + manifest.json.

    bf16  a cast of every floating tensor
    int8  round-to-nearest, symmetric, one scale per output channel, text-decoder linears only
    int4  GPTQ (4-bit, group 128, symmetric, no act-order) by GPTQModel in the export environment,
          text-decoder linears only; the manifest also measures plain round-to-nearest 4-bit on the
          same held-out samples, so GPTQ's gain is visible
Both quantized outputs are standard GPTQ checkpoints (shelfsight/model/gptq.py). The output appears whole or
not at all: everything is written to a hidden sibling folder and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from shelfsight.errors import FailedPrecondition, Internal, InvalidArgument
from shelfsight.export import calibration, fidelity
from shelfsight.export.staging import Staging
from shelfsight.model import checkpoint

SCHEMES = {"bf16": None, "int8": (8, -1), "int4": (4, 128)}
FIDELITY_MAX_PIXELS = calibration.MAX_PIXELS
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class QuantizeJob:
    model: Path
    scheme: str
    out: Path
    calibration: Path | None = None
    samples: int = 16
    heldout: int = 8
    force: bool = False
    device: str = "cpu"


def export_python() -> Path:
    """The export environment's interpreter (GPTQModel lives only there)."""
    env = os.environ.get("SHELFSIGHT_EXPORT_PYTHON")
    py = Path(env) if env else ROOT / ".venv-export" / "bin" / "python"
    if not py.exists():
        raise FailedPrecondition(f"the export environment is missing ({py}); run `make env` to build it")
    return py


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, processor, chat template, generation config: everything but weights and config."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != checkpoint.WEIGHT_SUFFIX and f.name not in (
                "config.json", "model.safetensors.index.json", "manifest.json"):
            shutil.copy2(f, dst / f.name)


def write_local(src: Path, dst: Path, bits: int | None, group_size: int) -> None:
    """Write `src` as bf16 (bits None) or as round-to-nearest GPTQ-format weights into `dst`."""
    import torch
    from safetensors.torch import save_file

    from shelfsight.model.gptq import is_decoder_linear, pack, quantization_config, rtn_quantize

    tensors = checkpoint.read_tensors(src)
    out = {}
    for name, t in tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if bits and module and is_decoder_linear(module):
            for leaf, packed in pack(rtn_quantize(t, bits, group_size)).items():
                out[f"{module}.{leaf}"] = packed.contiguous()
        else:
            out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    if bits:
        config["quantization_config"] = quantization_config(bits, group_size)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, dst)


def write_gptq(src: Path, dst: Path, samples: list, bits: int, group_size: int, device: str) -> str:
    """Run GPTQModel in the export environment; returns its version as recorded in the config."""
    py = export_python()
    with tempfile.TemporaryDirectory(prefix="shelfsight-calib-") as tmp:
        rows = []
        for i, s in enumerate(samples):
            path = Path(tmp) / f"{i:04d}.png"
            s.image.save(path)
            rows.append({"image": str(path), "question": s.question, "answer": s.answer})
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(src), "out": str(dst), "bits": bits,
                                   "group_size": group_size, "device": device, "samples": rows}))
        log_path = Path(tmp) / "gptq.log"
        with open(log_path, "w") as log:
            rc = subprocess.run([str(py), "-m", "shelfsight.export.gptq_worker", str(job)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp).returncode  # it writes logs/ into cwd
        text = log_path.read_text(errors="replace")
        if rc != 0:
            last = [ln for ln in text.splitlines() if ln.startswith("gptq_worker:")]
            raise Internal(f"GPTQ quantization failed: {last[-1] if last else text[-500:]}")
    config = json.loads((dst / "config.json").read_text())
    quantizers = config.get("quantization_config", {}).get("meta", {}).get("quantizer", [])
    return quantizers[0] if quantizers else "gptqmodel"


def measure(src: Path, candidates: dict[str, Path], held: list, device: str) -> dict[str, dict]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(src)
    inputs = fidelity.prepare(processor, held, FIDELITY_MAX_PIXELS)
    reference = checkpoint.load_model(src, device)
    runs = fidelity.reference_runs(reference, [{k: v.to(device) for k, v in i.items()} for i in inputs])
    del reference
    results = {}
    for name, path in candidates.items():
        model = checkpoint.load_model(path, device)
        results[name] = fidelity.compare(model, [{k: v.to(device) for k, v in i.items()} for i in inputs], runs)
        del model
    return results


def run(job: QuantizeJob, log=print) -> dict:
    if job.scheme not in SCHEMES:
        raise InvalidArgument(f"unknown scheme {job.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if job.samples < 1 or job.heldout < 1:
        raise InvalidArgument("--samples and the held-out count must be at least 1")
    info = checkpoint.inspect(job.model)
    if info.scheme != "bf16":
        raise FailedPrecondition(f"{job.model} is already quantized ({info.scheme}); export from the bf16 checkpoint")
    calib, held, calib_kind = calibration.load(job.calibration, job.samples, job.heldout)
    with Staging(job.out, job.force) as staging:  # whole on success, gone on any failure
        t0 = time.perf_counter()
        spec = SCHEMES[job.scheme]
        quantizer = "cast" if spec is None else "rtn"
        if job.scheme == "int4":
            quantizer = write_gptq(info.path, staging.path, calib, *spec, job.device)
        else:
            write_local(info.path, staging.path, *(spec or (None, -1)))
        quantize_s = time.perf_counter() - t0
        log(f"[quantize] {job.scheme} written in {quantize_s:.1f}s; measuring fidelity on {len(held)} held-out samples")

        t1 = time.perf_counter()
        candidates = {"fidelity": staging.path}
        rtn_dir = None
        if job.scheme == "int4":  # the same bits by plain rounding, to show what GPTQ buys
            rtn_dir = Path(tempfile.mkdtemp(prefix=".rtn-", dir=job.out.parent))
            write_local(info.path, rtn_dir, *spec)
            candidates["fidelity_rtn"] = rtn_dir
        try:
            figures = measure(info.path, candidates, held, job.device)
        finally:
            if rtn_dir:
                shutil.rmtree(rtn_dir, ignore_errors=True)
        manifest = build_manifest(job, info, quantizer, calib, held, calib_kind, quantize_s,
                                  time.perf_counter() - t1, figures)
        (staging.path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_manifest(job, info, quantizer, calib, held, calib_kind, quantize_s, fidelity_s, figures) -> dict:
    import torch
    import transformers

    bits, group = SCHEMES[job.scheme] or (16, None)
    uses_calibration = job.scheme == "int4"
    return {
        "format": "shelfsight.quantized/1",
        "scheme": job.scheme,
        "bits": bits,
        "group_size": group,
        "method": {"bf16": "cast", "int8": "rtn-per-channel", "int4": "gptq"}[job.scheme],
        "quantized": "text decoder linears" if job.scheme != "bf16" else "none",
        "source": {"path": str(info.path.resolve()), "fingerprint": checkpoint.fingerprint(info.path)},
        "calibration": ({"kind": calib_kind, "samples": len(calib),
                         "fingerprint": calibration.fingerprint(calib)} if uses_calibration else None),
        "heldout": {"samples": len(held), "fingerprint": calibration.fingerprint(held)},
        "time_s": {"quantize": round(quantize_s, 2), "fidelity": round(fidelity_s, 2)},
        **figures,
        "tools": {"quantizer": quantizer, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": sys.version.split()[0]},
        "device": job.device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
