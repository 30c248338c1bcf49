"""`shelfsight export quantize`: every scheme yields a standard checkpoint that reloads and generates,
the manifest carries its fields and measured fidelity, GPTQ beats round-to-nearest, bad input fails
cleanly with exit code 2 and leaves nothing behind."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from shelfsight.model import checkpoint, gptq, qlinear
from tests.conftest import shelfsight


def tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_scheme_reloads_and_generates(exports, scheme):
    path, _ = exports[scheme]
    assert checkpoint.inspect(path).scheme == scheme
    model = checkpoint.load_model(path)
    down = model.model.language_model.layers[0].mlp.down_proj
    expected = {"bf16": torch.nn.Linear, "int8": qlinear.Int8Linear, "int4": qlinear.Int4Linear}[scheme]
    assert isinstance(down, expected)
    assert isinstance(model.model.visual.blocks[0].mlp.linear_fc1, torch.nn.Linear)  # vision stays bf16
    from transformers import AutoProcessor
    from PIL import Image

    processor = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Brand?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (256, 320), (10, 90, 200))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_manifest_fields(exports, tiny_checkpoint, scheme):
    path, manifest = exports[scheme]
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["scheme"] == scheme
    assert manifest["source"]["fingerprint"] == checkpoint.fingerprint(tiny_checkpoint)
    assert manifest["time_s"]["quantize"] >= 0 and manifest["time_s"]["fidelity"] > 0
    fid = manifest["fidelity"]
    assert fid["samples"] == manifest["heldout"]["samples"] == 8
    assert fid["tokens"] == 8 * 16
    assert 0.0 <= fid["token_agreement"] <= 1.0 and -1.0 <= fid["logit_cosine_min"] <= fid["logit_cosine_mean"] <= 1.0
    if scheme == "int4":
        assert manifest["group_size"] == 128 and manifest["method"] == "gptq"
        assert manifest["calibration"]["samples"] == 12 and len(manifest["calibration"]["fingerprint"]) == 64
        assert manifest["calibration"]["fingerprint"] != manifest["heldout"]["fingerprint"]
        assert manifest["tools"]["quantizer"].startswith("gptqmodel")
    else:
        assert manifest["calibration"] is None  # round-to-nearest and casting use no data
    if scheme == "bf16":  # the cast is an identity and both sides are read by one forward path: exact
        assert fid["logit_cosine_min"] == 1.0 and fid["token_agreement"] == 1.0


def test_agreement_compares_like_with_like(tiny_checkpoint, tmp_path):
    """token_agreement sets the candidate's top-1 against the reference's top-1 from the same teacher-forced
    forward, never against generate()'s tokens: an incremental decode may break a near-tie the other way
    (it did on an AMD EPYC: 0.9844 for an identity cast), and that must not count against a candidate."""
    from transformers import AutoProcessor

    from shelfsight.export import calibration, fidelity, quantize

    inputs = fidelity.prepare(AutoProcessor.from_pretrained(tiny_checkpoint), calibration.synthetic(2, seed=5),
                              quantize.FIDELITY_MAX_PIXELS)
    model = checkpoint.load_model(tiny_checkpoint)
    real_generate = model.generate

    def generate_with_other_ties(**kw):
        # Stands in for a decode kernel of another machine, which cannot run here: the real greedy answer
        # with two of its tokens resolved differently (ids below 100,000 are plain text tokens).
        seq = real_generate(**kw).clone()
        for pos in (-12, -4):
            seq[0, pos] = (seq[0, pos] + 1) % 100_000
        return seq

    model.generate = generate_with_other_ties
    runs = fidelity.reference_runs(model, inputs)
    same = fidelity.compare(model, inputs, runs)
    assert same["tokens"] == 2 * fidelity.NEW_TOKENS
    assert same["token_agreement"] == 1.0 and same["logit_cosine_min"] == 1.0

    # and the measure still sees a candidate that differs: 4-bit round-to-nearest of the same model
    quantize.write_local(tiny_checkpoint, tmp_path, 4, 32)
    rtn = fidelity.compare(checkpoint.load_model(tmp_path), inputs, runs)
    assert rtn["logit_cosine_mean"] < 1.0 and rtn["token_agreement"] < 1.0


def test_gptq_beats_round_to_nearest_on_heldout(exports):
    _, manifest = exports["int4"]
    gptq_fid, rtn_fid = manifest["fidelity"], manifest["fidelity_rtn"]
    assert gptq_fid["logit_cosine_mean"] > rtn_fid["logit_cosine_mean"]
    assert gptq_fid["token_agreement"] >= rtn_fid["token_agreement"]
    # and int8 is closer still than any 4-bit
    assert exports["int8"][1]["fidelity"]["logit_cosine_mean"] > gptq_fid["logit_cosine_mean"]


def test_int4_is_a_standard_gptq_checkpoint(exports):
    path, _ = exports["int4"]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"], q["bits"], q["group_size"], q["sym"], q["desc_act"]) == \
        ("gptq", "gptq", 4, 128, True, False)
    t = tensors(path)
    prefix = "model.language_model.layers.0.mlp.down_proj"  # in_features 256, out 128
    assert t[f"{prefix}.qweight"].dtype == torch.int32 and t[f"{prefix}.qweight"].shape == (256 // 8, 128)
    assert t[f"{prefix}.qzeros"].shape == (2, 128 // 8)
    assert t[f"{prefix}.scales"].dtype == torch.float16 and t[f"{prefix}.scales"].shape == (2, 128)
    assert torch.equal(t[f"{prefix}.g_idx"], torch.arange(256, dtype=torch.int32) // 128)
    assert (t[f"{prefix}.qzeros"] == 0x77777777).all()  # symmetric: zero point 8, stored as 7
    assert f"{prefix}.weight" not in t
    assert t["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16
    visual = [k for k in t if k.startswith("model.visual.")]
    assert visual and all(t[k].dtype == torch.bfloat16 for k in visual)


def test_int8_is_per_channel_symmetric(exports):
    path, _ = exports["int8"]
    t = tensors(path)
    prefix = "model.language_model.layers.1.self_attn.q_proj"  # in 128, out 4 heads * 32 = 128
    assert t[f"{prefix}.qweight"].shape == (128 // 4, 128)
    assert t[f"{prefix}.scales"].shape == (1, 128)
    assert (t[f"{prefix}.qzeros"] == 0x7F7F7F7F).all()  # zero point 128, stored as 127


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, -1)])
def test_pack_unpack_roundtrip_and_rtn_error(bits, group):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    q = gptq.rtn_quantize(w, bits, group)
    back = gptq.unpack(gptq.pack(q), bits)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.scales, q.scales.to(torch.float16))
    g = torch.arange(256) // q.group_size
    err = (w - q.dequantize()).abs().t()  # [k, n]
    # round-to-nearest: within half a step; the scale is stored as fp16 (rel. precision 2^-11), so the
    # largest weight may sit a hair past the last code: (2^bits - 1) / 2 steps * 2^-11 of slack
    slack = (2**bits - 1) / 2 * 2**-11
    assert (err <= q.scales.float()[g] * (0.5 + slack) + 1e-7).all()


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 64), (8, -1)])
def test_kernels_match_dequantized_reference(bits, group):
    torch.manual_seed(1)
    q = gptq.rtn_quantize(torch.randn(96, 256) * 0.05, bits, group)
    x = torch.randn(5, 3, 256, dtype=torch.bfloat16)
    fast = qlinear.make_linear(q, torch.device("cpu"))
    ref = qlinear.make_linear(q, torch.device("cpu"), reference=True)
    y, y_ref = fast(x).float(), ref(x).float()
    assert y.shape == (5, 3, 96)
    assert (y - y_ref).norm() / y_ref.norm() < 1e-2


@pytest.mark.parametrize("bits,group", [(4, 128), (8, -1)])
def test_rtn_keeps_every_tensor_on_the_weights_device(bits, group):
    """Quantizing a weight on a GPU must not leave zero points (or g_idx) behind on the CPU. The meta
    device stands in for the GPU here: any tensor created without the weight's device lands on the CPU."""
    w = torch.empty(96, 256, dtype=torch.bfloat16, device="meta")
    q = gptq.rtn_quantize(w, bits, group)
    assert {t.device for t in (q.codes, q.zeros, q.scales)} == {w.device}
    assert (q.codes.dtype, q.zeros.dtype, q.scales.dtype) == (torch.int32, torch.int32, torch.float16)
    packed = gptq.pack(q)
    assert {t.device for t in packed.values()} == {w.device}
    assert {k: t.dtype for k, t in packed.items()} == {"qweight": torch.int32, "qzeros": torch.int32,
                                                      "scales": torch.float16, "g_idx": torch.int32}


def test_act_order_checkpoints_are_refused():
    q = gptq.rtn_quantize(torch.randn(16, 128), 4, 32)
    packed = gptq.pack(q)
    packed["g_idx"] = packed["g_idx"].flip(0)
    with pytest.raises(ValueError, match="act-order"):
        gptq.unpack(packed, 4)


# ---- bad input: one line naming the problem, exit code 2, nothing written ----

def assert_clean_failure(result, out, must_mention):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert must_mention in lines[0]
    assert not out.exists() or not any(out.iterdir()) or (out / "keep.txt").exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or p.name.startswith(".rtn-")]


def test_missing_model_directory(tmp_path):
    out = tmp_path / "out"
    r = shelfsight("export", "quantize", "--model", str(tmp_path / "nope"), "--scheme", "int8", "--out", str(out))
    assert_clean_failure(r, out, "does not exist")


def test_not_a_qwen3_vl_checkpoint(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    r = shelfsight("export", "quantize", "--model", str(src), "--scheme", "int8", "--out", str(out))
    assert_clean_failure(r, out, "not Qwen3-VL")


def test_unknown_scheme(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    r = shelfsight("export", "quantize", "--model", str(tiny_checkpoint), "--scheme", "int3", "--out", str(out))
    assert_clean_failure(r, out, "int3")


def test_existing_output_without_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = shelfsight("export", "quantize", "--model", str(tiny_checkpoint), "--scheme", "bf16", "--out", str(out))
    assert_clean_failure(r, out, "--force")
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_unreadable_calibration_image(tiny_checkpoint, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    from shelfsight import synth

    for i, (img, *_rest) in enumerate(synth.samples(4, seed=3)):
        img.save(calib / f"{i}.png")
    (calib / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    r = shelfsight("export", "quantize", "--model", str(tiny_checkpoint), "--scheme", "int4", "--out", str(out),
                   "--calibration", str(calib))
    assert_clean_failure(r, out, "2.png")


def test_already_quantized_source(exports, tmp_path):
    out = tmp_path / "out"
    r = shelfsight("export", "quantize", "--model", str(exports["int8"][0]), "--scheme", "int4", "--out", str(out))
    assert_clean_failure(r, out, "already quantized")


def test_force_replaces_whole(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = shelfsight("export", "quantize", "--model", str(tiny_checkpoint), "--scheme", "bf16", "--out", str(out),
                   "--heldout", "1", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    assert json.loads(r.stdout)["scheme"] == "bf16"
