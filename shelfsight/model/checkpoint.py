"""A Qwen3-VL checkpoint directory: what it is (bf16 / int8 / int4 GPTQ), its fingerprint, and loading
it for inference through the standard transformers classes.

Quantized checkpoints are standard GPTQ (shelfsight/model/gptq.py). They load without GPTQModel, the way
gpt-fast loads: transformers builds the model from config.json minus its quantization block on the meta
device (no memory, no random init), each text-decoder linear is swapped for a module over torch's own
weight-only kernels (shelfsight/model/qlinear.py) built on the target device from the packed tensors, and the
unquantized tensors (vision tower, embedding, norms) are read from the safetensors straight onto the
device. No dense decoder weight is ever allocated.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from shelfsight.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from shelfsight.model import qwen

WEIGHT_SUFFIX = ".safetensors"
GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")  # the packed tensors of one quantized linear
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


def read_tensors(path: Path, keep=None, device="cpu") -> dict:
    """Tensors from every weight file of the checkpoint (all, or those whose name `keep` accepts),
    read straight onto `device`."""
    from safetensors import safe_open

    out = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                if keep is None or keep(key):
                    out[key] = fh.get_tensor(key)
    return out


def packed_linears(path: Path) -> dict[str, dict[str, Path]]:
    """{module name: {GPTQ leaf: weight file holding it}} for every quantized linear (headers only)."""
    from safetensors import safe_open

    index: dict[str, dict[str, Path]] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                module, _, leaf = key.rpartition(".")
                if leaf in GPTQ_LEAVES:
                    index.setdefault(module, {})[leaf] = f
    return index


def quantized_modules(path: Path, bits: int, index: dict[str, dict[str, Path]] | None = None):
    """(module name, QuantizedTensor) for every GPTQ-packed linear in the checkpoint, one at a time:
    unpacked codes are int32 (8x the packed int4 bytes; 5.6 GB for the 2B decoder), so a loader that
    turns each into its module before the next holds one linear's codes, not the decoder's.
    `index`: packed_linears(path), when the caller has already read it."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from shelfsight.model.gptq import unpack

    index = packed_linears(path) if index is None else index
    with ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in weight_files(path)}
        for module, leaves in index.items():
            yield module, unpack({leaf: files[f].get_tensor(f"{module}.{leaf}") for leaf, f in leaves.items()}, bits)


def load_model(path: str | Path, device: str = "cpu", reference: bool = False, dtype: str = "bfloat16"):
    """Load any served checkpoint for inference (eval mode), computing in `dtype`.

    bf16 goes through transformers' from_pretrained (it builds on meta and loads: no random init);
    quantized checkpoints through load_quantized.
    reference=True loads quantized weights as dense dequantized linears: the same numbers through
    plain matmuls, which parity tests run transformers' own generate() on.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    info = inspect(path)
    dev = torch.device(device)
    compute = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(info.path)
    if info.scheme == "bf16":
        model = AutoModelForImageTextToText.from_pretrained(info.path, config=config, dtype=compute)
        return model.to(dev).eval()
    model = load_quantized(info, config, dev, compute, reference)
    logging.getLogger(__name__).info("loaded %s (%s) on %s", info.path, info.scheme, dev)
    return model.eval()


def load_quantized(info: CheckpointInfo, config, dev, compute, reference: bool = False):
    """A GPTQ checkpoint as a model whose every tensor lives on `dev`, built without materialising the
    dense decoder: meta skeleton -> quantized linears swapped in -> remaining tensors assigned."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from shelfsight.model.gptq import is_decoder_linear
    from shelfsight.model.qlinear import make_linear

    # Without its quantization block transformers builds plain linears for the decoder; on meta they
    # cost nothing and are replaced below.
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=compute)
    index = packed_linears(info.path)
    found = set(index)
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_decoder_linear(n)}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise FailedPrecondition(f"{info.path}: quantized modules do not match the decoder "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, q in quantized_modules(info.path, info.bits, index):
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, make_linear(q, dev, compute, reference))
    packed = tuple(f".{leaf}" for leaf in GPTQ_LEAVES)
    tensors = read_tensors(info.path, keep=lambda k: not k.endswith(packed), device=dev)
    shapes = model.state_dict()  # meta tensors: names, shapes and the dtypes from_pretrained would load
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        raise FailedPrecondition(f"{info.path} holds tensors this model does not have: {unknown[:3]}")
    for name, t in tensors.items():
        if t.shape != shapes[name].shape:
            raise FailedPrecondition(f"{info.path}: tensor {name} is {tuple(t.shape)}, the model's config "
                                     f"says {tuple(shapes[name].shape)}")
        tensors[name] = t.to(shapes[name].dtype)
    missing = model.load_state_dict(tensors, strict=False, assign=True).missing_keys
    model.tie_weights()  # lm_head.weight is the embedding where the config ties them (the checkpoint has one)
    _rebuild_buffers(model, dev)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.is_meta:
            if name in missing:
                raise FailedPrecondition(f"{info.path} lacks tensor {name}")
            raise Internal(f"loading {info.path} left {name} on the meta device")
    try:
        model.generation_config = GenerationConfig.from_pretrained(info.path)  # as from_pretrained does
    except OSError:
        pass  # no generation_config.json: keep the one derived from config.json
    return model


def _rebuild_buffers(model, dev) -> None:
    """Non-persistent buffers (the rotary embeddings' inv_freq) are computed in __init__ and are not in
    the checkpoint; built on meta they hold nothing. Run the owning module's __init__ again, on the CPU
    as from_pretrained computes them (bit-identical), and move the result to `dev`."""
    for name, module in model.named_modules():
        empty = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not empty:
            continue
        if next(module.parameters(recurse=False), None) is not None or not hasattr(module, "config"):
            raise Internal(f"cannot recompute buffer {name}.{empty[0]}: {type(module).__name__} is not "
                           "a parameter-free module built from its config")
        fresh = type(module)(module.config)
        for b in empty:
            setattr(module, b, getattr(fresh, b).to(dev))
