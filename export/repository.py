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

from shelfsight import params
from shelfsight.engine import EngineConfig, preset
from shelfsight.errors import InvalidArgument
from shelfsight.export.staging import Staging
from shelfsight.model import checkpoint, imaging, qwen
from shelfsight.params import GenerationParams
from shelfsight.serving import contract, manifest

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
STEPS = ("preprocess", "generate", "collect")  # Python models, each with its model.py adapter
ENSEMBLE_TEMPLATE = "pipeline"  # rendered once per public contract (contract.ANSWERS_FROM)


@dataclass(frozen=True)
class RepositoryJob:
    model: Path
    out: Path
    device: str = "cpu"  # a key of shelfsight.engine.PRESETS: cpu | gpu
    preprocess_instances: int = 2
    collect_instances: int = 1  # each instance keeps many answers in flight (collect/1/model.py)
    max_batch: int = EngineConfig.max_batch
    min_pixels: int = imaging.PixelBounds.min_pixels
    max_pixels: int = imaging.PixelBounds.max_pixels
    max_new_tokens: int = GenerationParams.max_new_tokens
    force: bool = False


def generation_defaults(ckpt: Path, max_new_tokens: int) -> GenerationParams:
    """The study's structured-recognition settings (GenerationParams' defaults); top_k from the
    checkpoint's generation config."""
    top_k = GenerationParams.top_k
    gen = ckpt / "generation_config.json"
    if gen.exists():
        top_k = int(json.loads(gen.read_text()).get("top_k") or 0)
    return GenerationParams(max_new_tokens=max_new_tokens, top_k=top_k)


def parameter_inputs() -> dict[str, str]:
    """The ensemble configs' lines for the generation parameters: one optional input each, and the
    ensemble's map of each into `preprocess` (names and types from shelfsight/serving/contract.py)."""
    inputs = [f'  {{ name: "{name}" data_type: {contract.CONFIG_TYPE[kind]} dims: [ 1 ] optional: true }}'
              for name, kind in (contract.OPTIONAL[f] for f in params.FIELDS)]
    mapping = [f'      input_map {{ key: "{name}" value: "{name}" }}' for name in contract.PARAMETER_INPUTS]
    return {"PARAMETER_INPUTS": ",\n".join(inputs), "PARAMETER_MAP": "\n".join(mapping)}


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
    target = preset(job.device)
    for name in ("preprocess_instances", "collect_instances", "max_batch"):
        if getattr(job, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < job.min_pixels <= job.max_pixels:
        raise InvalidArgument(f"pixel bounds must satisfy 0 < min ({job.min_pixels}) <= max ({job.max_pixels})")
    info = checkpoint.inspect(job.model)
    fingerprint = checkpoint.fingerprint(info.path)
    served = manifest.ServingManifest(
        checkpoint=str(info.path.resolve()), fingerprint=fingerprint,
        model_id=f"{info.path.resolve().name}@{fingerprint[:12]}", scheme=info.scheme,
        device=target.device, dtype=target.dtype,
        generation=generation_defaults(info.path, job.max_new_tokens),
        pixels=imaging.PixelBounds(job.min_pixels, job.max_pixels),
        engine=replace(target.engine, max_batch=job.max_batch),
    )
    values = {"MAX_BATCH": job.max_batch, "PATCH_DIM": patch_dim(info.config),
              "SERVING_JSON": public_json(served),
              "PREPROCESS_INSTANCES": job.preprocess_instances, "COLLECT_INSTANCES": job.collect_instances,
              "GENERATE_KIND": "KIND_GPU" if target.device == "cuda" else "KIND_CPU", **parameter_inputs()}

    def write(model: str, template: str, **extra) -> None:
        dst = staging.path / model
        (dst / "1").mkdir(parents=True)
        config = Template((TEMPLATES / template / "config.pbtxt").read_text()).substitute(values, **extra)
        (dst / "config.pbtxt").write_text(config)

    with Staging(job.out, job.force) as staging:
        for model in STEPS:
            write(model, model)
            shutil.copy2(TEMPLATES / model / "1" / "model.py", staging.path / model / "1" / "model.py")
        for name, answers_from in contract.ANSWERS_FROM.items():
            write(name, ENSEMBLE_TEMPLATE, NAME=name, ANSWERS_FROM=answers_from)
        (staging.path / manifest.FILENAME).write_text(served.to_json())
    return served
