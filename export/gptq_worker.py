"""GPTQ quantization with GPTQModel. Runs in the export environment only (numpy>=2.4.6, which would
break Triton's Python stub), as a child process of `shelfsight export quantize`:

    .venv-export/bin/python -m shelfsight.export.gptq_worker JOB.json

JOB.json: {"model": DIR, "out": DIR, "bits": 4, "group_size": 128, "device": "cpu",
           "samples": [{"image": PNG path, "question": str, "answer": str}, ...]}
Writes a standard GPTQ checkpoint (sym, no act-order) into "out". GPTQModel's own Qwen3-VL definition
quantizes only the text decoder's linears; the vision tower, embedding and lm_head stay bf16.
Exit code 0 on success; on failure one line on stderr naming the problem.
"""
from __future__ import annotations

import json
import os
import sys


def main(job_path: str) -> int:
    job = json.loads(open(job_path).read())
    # GPTQModel spawns a worker per core by default; this machine class has two.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from PIL import Image

    conversations = []
    for s in job["samples"]:
        with Image.open(s["image"]) as im:
            image = im.convert("RGB")
        conversations.append([
            {"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": s["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": s["answer"]}]},
        ])
    cfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=False, sym=True,
                         device=job["device"])
    model = GPTQModel.load(job["model"], cfg)  # no `device` here: cfg.device already says it
    model.quantize(conversations, batch_size=1)
    model.save(job["out"])
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m shelfsight.export.gptq_worker JOB.json", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except Exception as e:  # one line for the parent to show; the traceback goes to the log above it
        import traceback

        traceback.print_exc()
        print(f"gptq_worker: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
