"""Quantized checkpoints load on the meta device (checkpoint.load_quantized): every tensor ends up on the
device, equal to what the old dense-then-swap loading gave, and the dense decoder is never allocated.

The checkpoints are the tiny model written as GPTQ-format round-to-nearest int4 (group 128) and int8
(per channel) by the export's own writer: the same file format GPTQModel writes, in a second."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from shelfsight.errors import FailedPrecondition
from shelfsight.model import checkpoint
from tests.conftest import ROOT

# The loading this replaced (a random dense decoder, built then thrown away) lives on as the
# benchmark's baseline; the tests compare against that one copy of it.
_spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
bench_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_load)

SCHEMES = {"int4": (4, 128), "int8": (8, -1)}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory) -> dict:
    from shelfsight.export.quantize import write_local

    out = {}
    for scheme, (bits, group) in SCHEMES.items():
        out[scheme] = tmp_path_factory.mktemp(scheme)
        write_local(tiny_checkpoint, out[scheme], bits, group)
    return out


def everything(model) -> dict:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_model_as_dense_then_swap(quantized, scheme):
    old = bench_load.dense_then_swap(quantized[scheme], dtype="float32")
    new = checkpoint.load_model(quantized[scheme], dtype="float32")
    want, got = everything(old), everything(new)
    assert got.keys() == want.keys()
    assert not [n for n, t in got.items() if t.is_meta]
    # includes the rotary inv_freq buffers, which are not in the checkpoint and are built in __init__
    assert "model.language_model.rotary_emb.inv_freq" in got and "model.visual.rotary_pos_emb.inv_freq" in got
    differ = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
    assert differ == []
    assert new.lm_head.weight is new.model.language_model.embed_tokens.weight  # tied as the config says
    assert new.generation_config == old.generation_config
    ids = torch.arange(100, 140).view(2, 20)
    with torch.no_grad():
        assert torch.equal(new(input_ids=ids).logits, old(input_ids=ids).logits)


class DenseDecoderWatch(TorchDispatchMode):
    """Records every floating-point tensor that any op creates on a real device with the shape of a
    dense decoder weight found nowhere in the checkpoint (so loading the vision tower does not count)."""

    def __init__(self, shapes: set):
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point() and tuple(t.shape) in self.shapes:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dense_decoder_is_never_allocated(quantized, scheme):
    path = quantized[scheme]
    stored = {tuple(t.shape) for t in load_file(str(path / "model.safetensors")).values()}
    q = checkpoint.quantized_modules(path, SCHEMES[scheme][0])
    dense = {(m.out_features, m.in_features) for _, m in q} - stored
    assert dense  # the tiny model's q/o and gate/up weights have shapes of their own
    with DenseDecoderWatch(dense) as watch:
        bench_load.dense_then_swap(path)
    assert watch.seen  # the watch sees the old loading build them
    with DenseDecoderWatch(dense) as watch:
        checkpoint.load_model(path, dtype="float32")
    assert watch.seen == []


def rewrite(src, dst, change) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_or_foreign_tensor_is_named(quantized, tmp_path):
    rewrite(quantized["int4"], tmp_path / "missing", lambda t: t.pop("model.language_model.norm.weight"))
    with pytest.raises(FailedPrecondition, match=r"lacks tensor model\.language_model\.norm\.weight"):
        checkpoint.load_model(tmp_path / "missing")
    rewrite(quantized["int4"], tmp_path / "foreign", lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(FailedPrecondition, match=r"does not have: \['model\.extra\.weight'\]"):
        checkpoint.load_model(tmp_path / "foreign")
    rewrite(quantized["int4"], tmp_path / "shape", lambda t: t.update(
        {"model.language_model.norm.weight": torch.ones(7, dtype=torch.bfloat16)}))
    with pytest.raises(FailedPrecondition, match=r"norm\.weight is \(7,\)"):
        checkpoint.load_model(tmp_path / "shape")


def test_int4_engine_answers_alike_with_tinygemm_or_the_dense_copy(quantized):
    """EngineConfig.int4_dense_from: 0 keeps tinygemm at every batch (no copy); 2 moves every matmul of
    2 rows or more (decode at 4 rows, prefill) to the dequantized copy. Same answers either way; the
    copy's bytes are reported, and CPU's default (-1) keeps none."""
    from transformers import AutoTokenizer

    from shelfsight import params
    from shelfsight.engine import Engine, EngineConfig, Request
    from shelfsight.model import imaging
    from shelfsight.model.preprocessing import load_preprocessor
    from shelfsight.params import GenerationParams
    from tests.test_engine import QUESTIONS, Collect, images

    path = quantized["int4"]
    tok = AutoTokenizer.from_pretrained(path)
    pre = load_preprocessor(path, 65_536, 1_048_576, imaging.ImageLimits(), params.Limits())
    answers, kernels = {}, {}
    for setting in (-1, 0, 2):
        model = checkpoint.load_model(path, dtype="float32")
        engine = Engine(model, tok, EngineConfig(max_batch=4, int4_dense_from=setting))
        engine.start()
        try:
            sinks = [Collect() for _ in range(4)]
            for i, s in enumerate(sinks):
                engine.submit(Request.of(pre(images()[i], QUESTIONS[i]), GenerationParams(max_new_tokens=8, temperature=0.0),
                                         s))
            assert all(s.done.wait(120) for s in sinks)
            answers[setting] = [s.text for s in sinks]
            kernels[setting] = engine.runner.int4_kernels
        finally:
            engine.stop()
    assert kernels[-1] is None and kernels[0] == {"dense_from": None, "dense_bytes": 0, "timings": []}
    assert kernels[2]["dense_from"] == 2 and kernels[2]["dense_bytes"] > 0
    assert answers[0] == answers[2] == answers[-1]
    assert len(set(answers[0])) > 1  # the requests were told apart
