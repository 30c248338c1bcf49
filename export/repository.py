"""`shelfsight export repository`: lay out a Triton model repository for one checkpoint.

Copies the templates in model_repository/ (thin model.py adapters + config.pbtxt with ${...}
placeholders), fills the configs, and writes shelfsight.json: the serving manifest every model reads
at start-up (checkpoint, scheme, device, generation defaults, pixel limits, engine sizes).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from string import Template

from shelfsight import checkpoint, manifest, qwen
from shelfsight.engine import EngineConfig
from shelfsight.errors import InvalidArgument
from shelfsight.export.staging import Staging
from shelfsight.params import GenerationParams

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("preprocess", "generate", "collect", "pipeline", "pipeline_stream")


@dataclass(frozen=True)
class RepositoryJob:
    model: Path
    out: Path
    device: str = "cpu"  # cpu | gpu
    preprocess_instances: int = 2
    collect_instances: int = 1  # each instance keeps many answers in flight (collect/1/model.py)
    max_batch: int = 32
    min_pixels: int = manifest.PixelBounds.min_pixels
    max_pixels: int = manifest.PixelBounds.max_pixels
    max_new_tokens: int = GenerationParams.max_new_tokens
    force: bool = False


def generation_defaults(ckpt: Path, max_new_tokens: int) -> GenerationParams:
    """The study's structured-recognition settings; top_k from the checkpoint's generation config."""
    top_k = GenerationParams.top_k
    gen = ckpt / "generation_config.json"
    if gen.exists():
        top_k = int(json.loads(gen.read_text()).get("top_k") or 0)
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.3, top_p=0.85, top_k=top_k,
                            repetition_penalty=1.1)


def patch_dim(config: dict) -> int:
    v = config.get("vision_config", {})
    patch = v.get("patch_size", qwen.PATCH_SIZE)
    return v.get("in_channels", 3) * v.get("temporal_patch_size", qwen.TEMPORAL_PATCH_SIZE) * patch * patch


def public_json(served: manifest.ServingManifest) -> str:
    """The client-facing part of the manifest, escaped for a protobuf text-format string."""
    doc = {k: v for k, v in asdict(served).items() if k in ("model_id", "scheme", "generation", "limits",
                                                           "pixels", "image_limits")}
    return json.dumps(doc, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')


def build(job: RepositoryJob) -> manifest.ServingManifest:
    if job.device not in ("cpu", "gpu"):
        raise InvalidArgument(f"--device must be cpu or gpu, got {job.device!r}")
    for name in ("preprocess_instances", "collect_instances", "max_batch"):
        if getattr(job, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < job.min_pixels <= job.max_pixels:
        raise InvalidArgument(f"pixel bounds must satisfy 0 < min ({job.min_pixels}) <= max ({job.max_pixels})")
    info = checkpoint.inspect(job.model)
    fingerprint = checkpoint.fingerprint(info.path)
    gpu = job.device == "gpu"
    served = manifest.ServingManifest(
        checkpoint=str(info.path.resolve()), fingerprint=fingerprint,
        model_id=f"{info.path.resolve().name}@{fingerprint[:12]}", scheme=info.scheme,
        device="cuda" if gpu else "cpu",
        # On CPU, bf16 matmuls round differently with batch shape, so answers could depend on what
        # else is batched; fp32 keeps them batch-invariant there. GPUs compute in bf16.
        dtype="bfloat16" if gpu else "float32",
        generation=generation_defaults(info.path, job.max_new_tokens),
        pixels=manifest.PixelBounds(job.min_pixels, job.max_pixels),
        engine=replace(EngineConfig(), max_batch=job.max_batch,
                       max_prefill_tokens=16_384 if gpu else 4096,
                       vision_cache_bytes=(1 << 30) if gpu else (256 << 20)),
    )
    values = {"MAX_BATCH": job.max_batch, "PATCH_DIM": patch_dim(info.config),
              "SERVING_JSON": public_json(served),
              "PREPROCESS_INSTANCES": job.preprocess_instances, "COLLECT_INSTANCES": job.collect_instances,
              "GENERATE_KIND": "KIND_GPU" if gpu else "KIND_CPU"}
    with Staging(job.out, job.force) as staging:
        for model in MODELS:
            src, dst = TEMPLATES / model, staging.path / model
            (dst / "1").mkdir(parents=True)
            config = Template((src / "config.pbtxt").read_text()).substitute(values)
            (dst / "config.pbtxt").write_text(config)
            if (src / "1" / "model.py").exists():
                shutil.copy2(src / "1" / "model.py", dst / "1" / "model.py")
        (staging.path / manifest.FILENAME).write_text(served.to_json())
    return served
