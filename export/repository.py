"""`shelfsight export repository`: lay out a Triton model repository for the checkpoints served.

A generator (the pipeline ensembles: preprocess, generate, collect), an embedding model (`embed`) and a
reranker (`rerank`), each optional, at least one. Copies the templates in model_repository/ (thin
model.py adapters + config.pbtxt with ${...} placeholders), fills the configs, and writes
shelfsight.json: the serving manifest every model reads at start-up (checkpoints, device, generation
defaults, pixel limits, engine and encoder sizes).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from string import Template

from shelfsight import params
from shelfsight.engine import EncoderConfig, EngineConfig, preset
from shelfsight.errors import InvalidArgument
from shelfsight.export.staging import Staging
from shelfsight.model import checkpoint, imaging
from shelfsight.params import GenerationParams
from shelfsight.serving import contract, manifest

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
STEPS = ("preprocess", "generate", "collect")  # Python models, each with its model.py adapter
ENSEMBLE_TEMPLATE = "pipeline"  # rendered once per public contract (contract.ANSWERS_FROM)


@dataclass(frozen=True)
class RepositoryJob:
    model: Path | None  # the generator; None: a repository of retrieval models only
    out: Path
    embedding: Path | None = None  # a Qwen3-VL-Embedding checkpoint -> the `embed` model
    reranker: Path | None = None  # a Qwen3-VL-Reranker checkpoint -> the `rerank` model
    dimensions: int = EncoderConfig.dimensions  # the embedding's default Matryoshka size (0 = full)
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


def served(path: Path) -> manifest.Served:
    info = checkpoint.inspect(path)
    fingerprint = checkpoint.fingerprint(info.path)
    return manifest.Served(path=str(info.path.resolve()), fingerprint=fingerprint,
                           model_id=f"{info.path.resolve().name}@{fingerprint[:12]}", scheme=info.scheme,
                           hidden_size=int(info.text_config.get("hidden_size", 0)))


def public_json(m: manifest.ServingManifest, kind: str) -> str:
    """What clients need to know about the model of `kind` (model id, defaults, limits), escaped for a
    protobuf text-format string: the gateway reads it with get_model_config."""
    one = m.served(kind)
    doc = {"model_id": one.model_id, "scheme": one.scheme, "kind": kind, "limits": asdict(m.limits),
           "pixels": asdict(m.pixels), "image_limits": asdict(m.image_limits)}
    if kind == "generator":
        doc["generation"] = asdict(m.generation)
    if kind == "embedding":
        doc |= {"width": one.hidden_size, "dimensions": m.encoder.dimensions or one.hidden_size}
    return json.dumps(doc, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')


def build(job: RepositoryJob) -> manifest.ServingManifest:
    target = preset(job.device)
    for name in ("preprocess_instances", "collect_instances", "max_batch"):
        if getattr(job, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < job.min_pixels <= job.max_pixels:
        raise InvalidArgument(f"pixel bounds must satisfy 0 < min ({job.min_pixels}) <= max ({job.max_pixels})")
    if job.model is None and job.embedding is None and job.reranker is None:
        raise InvalidArgument("give at least one checkpoint to serve: --model, --embedding or --reranker")
    models = {kind: served(path) if path is not None else None
              for kind, path in (("generator", job.model), ("embedding", job.embedding), ("reranker", job.reranker))}
    width = models["embedding"].hidden_size if models["embedding"] else 0
    if models["embedding"] and not 0 <= job.dimensions <= width:
        raise InvalidArgument(f"--dimensions must be between 1 and the embedding's width {width} (0 = {width})")
    m = manifest.ServingManifest(
        **models, device=target.device, dtype=target.dtype,
        generation=generation_defaults(job.model, job.max_new_tokens) if job.model else GenerationParams(),
        pixels=imaging.PixelBounds(job.min_pixels, job.max_pixels),
        engine=replace(target.engine, max_batch=job.max_batch),
        encoder=replace(target.encoder, dimensions=job.dimensions),
    )
    kind = "KIND_GPU" if target.device == "cuda" else "KIND_CPU"
    values = {"MAX_BATCH": job.max_batch, "PREPROCESS_INSTANCES": job.preprocess_instances, "COLLECT_INSTANCES": job.collect_instances,
              "GENERATE_KIND": kind, "ENCODER_KIND": kind, **parameter_inputs()}

    def write(model: str, template: str, code: bool, **extra) -> None:
        dst = staging.path / model
        (dst / "1").mkdir(parents=True)
        config = Template((TEMPLATES / template / "config.pbtxt").read_text()).substitute(values, **extra)
        (dst / "config.pbtxt").write_text(config)
        if code:
            shutil.copy2(TEMPLATES / template / "1" / "model.py", dst / "1" / "model.py")

    with Staging(job.out, job.force) as staging:
        if m.generator is not None:
            for model in STEPS:
                write(model, model, True, SERVING_JSON="")
            for name, answers_from in contract.ANSWERS_FROM.items():
                write(name, ENSEMBLE_TEMPLATE, False, NAME=name, ANSWERS_FROM=answers_from,
                      SERVING_JSON=public_json(m, "generator"))
        if m.embedding is not None:
            write(contract.EMBED, contract.EMBED, True, SERVING_JSON=public_json(m, "embedding"))
        if m.reranker is not None:
            write(contract.RERANK, contract.RERANK, True, SERVING_JSON=public_json(m, "reranker"))
        (staging.path / manifest.FILENAME).write_text(m.to_json())
    return m
