"""A Qwen3-VL checkpoint directory: what it is (bf16 / int8 / int4 GPTQ), its fingerprint, and loading
it for inference through the standard transformers classes.

Quantized checkpoints are standard GPTQ (shelfsight/model/gptq.py). They load without GPTQModel: transformers
builds the model from config.json minus its quantization block (the unquantized tensors - vision tower,
embedding, norms - load as usual), then each text-decoder linear is replaced by a module over torch's
own weight-only kernels (shelfsight/model/qlinear.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from shelfsight.errors import FailedPrecondition, InvalidArgument, NotFound
from shelfsight.model import qwen

WEIGHT_SUFFIX = ".safetensors"
# Files that define a checkpoint's behaviour; their bytes make its fingerprint.
FINGERPRINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                     "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    scheme: str  # bf16 | int8 | int4
    bits: int | None
    group_size: int | None
    config: dict

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config", {})


def inspect(path: str | Path) -> CheckpointInfo:
    """Validate that `path` is a Qwen3-VL checkpoint and say which scheme it holds."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"checkpoint directory {p} does not exist")
    if not p.is_dir():
        raise InvalidArgument(f"checkpoint {p} is not a directory")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise InvalidArgument(f"{p} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{cfg_path} is not readable JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type != qwen.MODEL_TYPE:
        raise FailedPrecondition(f"{p} holds a {model_type!r} model, not Qwen3-VL ({qwen.MODEL_TYPE!r})")
    if not weight_files(p):
        raise InvalidArgument(f"{p} has no *{WEIGHT_SUFFIX} weight files")
    q = config.get("quantization_config")
    if not q:
        return CheckpointInfo(p, "bf16", None, None, config)
    if q.get("quant_method") != "gptq":
        raise FailedPrecondition(f"{p} uses quantization {q.get('quant_method')!r}; only GPTQ is served")
    if q.get("desc_act"):
        raise FailedPrecondition(f"{p} was quantized with act-order (desc_act); export with it off")
    bits = int(q["bits"])
    if bits not in (4, 8):
        raise FailedPrecondition(f"{p} holds {bits}-bit weights; 4 and 8 are served")
    return CheckpointInfo(p, "int4" if bits == 4 else "int8", bits, int(q.get("group_size", -1)), config)


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob(f"*{WEIGHT_SUFFIX}"))


def fingerprint(path: str | Path) -> str:
    """sha256 over the weights and the files that shape behaviour, in a fixed order."""
    p = Path(path)
    h = hashlib.sha256()
    for f in weight_files(p) + [p / n for n in FINGERPRINT_FILES if (p / n).exists()]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def read_tensors(path: Path, names: set[str] | None = None) -> dict:
    """Tensors from every weight file of the checkpoint (all of them, or just `names`)."""
    from safetensors import safe_open

    out = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if names is None or key in names:
                    out[key] = fh.get_tensor(key)
    return out


def quantized_modules(path: Path, bits: int) -> dict:
    """{module name: QuantizedTensor} for every GPTQ-packed linear in the checkpoint."""
    from safetensors import safe_open

    from shelfsight.model.gptq import unpack

    groups: dict[str, dict] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                module, _, leaf = key.rpartition(".")
                if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                    groups.setdefault(module, {})[leaf] = fh.get_tensor(key)
    return {name: unpack(t, bits) for name, t in groups.items()}


def load_model(path: str | Path, device: str = "cpu", reference: bool = False, dtype: str = "bfloat16"):
    """Load any served checkpoint for inference (eval mode), computing in `dtype`.

    reference=True loads quantized weights as dense dequantized linears: the same numbers through
    plain matmuls, which parity tests run transformers' own generate() on.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from shelfsight.model.gptq import is_decoder_linear
    from shelfsight.model.qlinear import make_linear

    info = inspect(path)
    dev = torch.device(device)
    compute = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(info.path)
    if info.scheme == "bf16":
        model = AutoModelForImageTextToText.from_pretrained(info.path, config=config, dtype=compute)
        return model.to(dev).eval()
    # Without its quantization block transformers builds plain linears for the decoder: their packed
    # tensors go unused and the dense weights start random, until replaced below. Say so once, quietly.
    del config.quantization_config
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForImageTextToText.from_pretrained(info.path, config=config, dtype=compute)
    finally:
        hf_logging.set_verbosity(level)
    modules = quantized_modules(info.path, info.bits)
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_decoder_linear(n)}
    if set(modules) != expected:
        missing, extra = sorted(expected - set(modules)), sorted(set(modules) - expected)
        raise FailedPrecondition(f"{info.path}: quantized modules do not match the decoder "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model = model.to(dev)
    for name, q in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, make_linear(q, dev, compute, reference))
    logging.getLogger(__name__).info("loaded %s (%s, %d quantized linears) on %s",
                                     info.path, info.scheme, len(modules), dev)
    return model.eval()
