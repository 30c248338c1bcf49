"""The serving manifest: everything the Triton models of one repository need to know, written once by
`shelfsight export repository` as `<repo>/shelfsight.json` and read once by each model at start-up.
It is that process's settings object (frozen): the checkpoints served (a generator, an embedding
model, a reranker: any of them, at least one), device, generation defaults, pixel and text limits,
engine and encoder sizes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shelfsight.engine.config import EncoderConfig, EngineConfig
from shelfsight.errors import FailedPrecondition
from shelfsight.model.imaging import ImageLimits, PixelBounds
from shelfsight.params import GenerationParams, Limits

FILENAME = "shelfsight.json"
FORMAT = "shelfsight.repository/2"
KINDS = ("generator", "embedding", "reranker")


@dataclass(frozen=True)
class Served:
    """One checkpoint as served."""
    path: str
    fingerprint: str
    model_id: str  # what caches, catalogs and clients key on: name@fingerprint prefix
    scheme: str  # bf16 | int8 | int4
    hidden_size: int = 0  # the text decoder's width: the embedding's full dimension


@dataclass(frozen=True)
class ServingManifest:
    generator: Served | None
    embedding: Served | None = None
    reranker: Served | None = None
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # compute dtype: bf16 on GPU; fp32 on CPU (see docs/engine.md, "Precision on CPU": batch invariance)
    generation: GenerationParams = field(default_factory=GenerationParams)
    limits: Limits = field(default_factory=Limits)
    pixels: PixelBounds = field(default_factory=PixelBounds)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    preprocess_threads: int = 1
    generate_threads: int = 2  # torch intra-op threads of the generate process (CPU and GPU)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> "ServingManifest":
        nested = {"generation": GenerationParams, "limits": Limits, "pixels": PixelBounds,
                  "image_limits": ImageLimits, "engine": EngineConfig, "encoder": EncoderConfig,
                  **{kind: Served for kind in KINDS}}
        kwargs = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            kwargs[f.name] = nested[f.name](**value) if f.name in nested and value is not None else value
        return cls(**kwargs)

    def served(self, kind: str) -> Served:
        """The checkpoint of `kind`; FailedPrecondition when this repository serves none."""
        found = getattr(self, kind)
        if found is None:
            raise FailedPrecondition(f"this repository serves no {kind} model")
        return found


def load(repo: str | Path) -> ServingManifest:
    path = Path(repo) / FILENAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"{path} is missing: lay the repository out with `shelfsight export repository`") from None
    if raw.get("format") != FORMAT:
        raise FailedPrecondition(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}")
    return ServingManifest.from_dict(raw)
