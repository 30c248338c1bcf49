"""The unary `pipeline` contract under concurrency, on the real tritonserver with the tiny model: each
request is answered when its own generation ends (issue 14), with the same text as the stream, and the
stock-tritonclient example of docs/triton.md runs against it."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from shelfsight.serving.pipeline import PipelineClient
from tests import imagefiles
from tests.conftest import ROOT, run

SHORT, LONG = 2, 96
# Eight requests that arrive together, short and long answers interleaved. The tiny model has random
# weights and never emits EOS, so every answer is exactly max_new_tokens long.
LENGTHS = [LONG, SHORT, LONG, SHORT, SHORT, LONG, SHORT, LONG]


def pictures(n: int, first_seed: int) -> list[bytes]:
    return [imagefiles.encode(imagefiles.photo(448, 448, seed=first_seed + i), "JPEG", quality=90) for i in range(n)]


def test_each_unary_answer_comes_when_its_own_generation_ends(triton):
    images = pictures(len(LENGTHS), first_seed=700)

    async def timed(client, image, n, t0):
        answer = await client.infer(image, "Read the label.", temperature=0.0, max_new_tokens=n)
        return answer, time.perf_counter() - t0

    async def together():
        client = PipelineClient(triton.grpc_url)
        try:
            t0 = time.perf_counter()
            return await asyncio.gather(*[timed(client, d, n, t0) for d, n in zip(images, LENGTHS)])
        finally:
            await client.close()

    async def streamed(image, n):
        client = PipelineClient(triton.grpc_url)
        try:
            return "".join([d.text async for d in client.stream(image, "Read the label.", temperature=0.0,
                                                               max_new_tokens=n)])
        finally:
            await client.close()

    results = run(together())
    assert [a.completion_tokens for a, _ in results] == LENGTHS
    short = [t for (_, t), n in zip(results, LENGTHS) if n == SHORT]
    long = [t for (_, t), n in zip(results, LENGTHS) if n == LONG]
    # A short answer that shared a batch with long ones used to wait for them (it came back with the
    # slowest of its batch); now every short one is back before the first long one.
    assert max(short) < min(long), f"short answers at {sorted(short)} s, long ones at {sorted(long)} s"
    # Greedy: the unary text of each request is the text its stream gives (the vision cache is warm
    # now, which must not change an answer either).
    assert [a.text for a, _ in results] == [run(streamed(d, n)) for d, n in zip(images, LENGTHS)]


def test_readme_example_with_a_stock_tritonclient(triton, tmp_path):
    """examples/triton_client.py (shown in docs/triton.md, the contract's page) uses tritonclient alone."""
    photo = tmp_path / "product.jpg"
    photo.write_bytes(pictures(1, first_seed=800)[0])
    common = [sys.executable, str(ROOT / "examples" / "triton_client.py"), "--url", triton.grpc_url,
              "--image", str(photo)]
    plain = subprocess.run(common + ["--question", "What brand is this product?"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr
    # no optional inputs: the manifest's defaults, whose 256 tokens the random model always reaches
    status = plain.stdout.splitlines()[-1]
    assert status.startswith("finish_reason=length prompt_tokens=") and status.endswith(" completion_tokens=256")
    tuned = subprocess.run(common + ["--question", "What brand is this product?", "--max-new-tokens", "7",
                                     "--temperature", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tuned.returncode == 0, tuned.stderr
    assert tuned.stdout.splitlines()[-1].endswith(" completion_tokens=7")
    expected = run(_ask(triton.grpc_url, photo.read_bytes(), max_new_tokens=7, temperature=0.0)).text
    assert tuned.stdout.startswith(expected + "\nfinish_reason=length")
    bad = subprocess.run(common[:-2] + ["--image", str(ROOT / "README.md"), "--question", "q"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "not a supported format" in bad.stderr


def test_readme_snippet_runs_as_written(triton, tmp_path):
    """The python block of docs/triton.md's "Calling `pipeline` with a stock `tritonclient`", run with only
    the file name and the URL replaced."""
    page = (ROOT / "docs" / "triton.md").read_text()
    heading = "\n## Calling `pipeline` with a stock `tritonclient`\n"
    assert page.count(heading) == 1, f"docs/triton.md lost its section {heading.strip()!r}"
    section = page[page.index(heading):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]
    assert "product.jpg" in code and "localhost:8001" in code
    photo = tmp_path / "product.jpg"
    photo.write_bytes(pictures(1, first_seed=900)[0])
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("product.jpg", str(photo)).replace("localhost:8001", triton.grpc_url))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(" length")  # 64 tokens: the random model never stops sooner


async def _ask(url, image, **params):
    client = PipelineClient(url)
    try:
        return await client.infer(image, "What brand is this product?", **params)
    finally:
        await client.close()
