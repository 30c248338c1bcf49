"""Ask Triton's `pipeline` (the unary contract) about one picture with a stock `tritonclient`.

    pip install "tritonclient[grpc]"
    python examples/triton_client.py --url localhost:8001 --image product.jpg --question "What brand is this?"

Every input carries the batch dimension first (the ensemble has max_batch_size > 0), so one request
is a batch of one: IMAGE is UINT8 [1, n_bytes], each scalar is [1, 1]. Optional inputs that are left
out take the served model's defaults. Prints the answer, then its finish reason and token counts.
Uses nothing from shelfsight: this is what a platform service needs.
"""
import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def scalar(name, dtype, value):
    """One optional [1, 1] input (batch of one, one value)."""
    numpy_type = {"INT32": np.int32, "FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}[dtype]
    t = grpcclient.InferInput(name, [1, 1], dtype)
    t.set_data_from_numpy(np.array([[value]], dtype=numpy_type))
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="localhost:8001", help="Triton's gRPC endpoint")
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    args = ap.parse_args()

    with open(args.image, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)[None]  # [1, n_bytes]
    image = grpcclient.InferInput("IMAGE", list(data.shape), "UINT8")
    image.set_data_from_numpy(data)
    question = grpcclient.InferInput("QUESTION", [1, 1], "BYTES")
    question.set_data_from_numpy(np.array([[args.question.encode("utf-8")]], dtype=object))
    inputs = [image, question]
    if args.max_new_tokens is not None:
        inputs.append(scalar("MAX_NEW_TOKENS", "INT32", args.max_new_tokens))
    if args.temperature is not None:
        inputs.append(scalar("TEMPERATURE", "FP32", args.temperature))

    client = grpcclient.InferenceServerClient(args.url)
    try:
        result = client.infer("pipeline", inputs, client_timeout=300)
    except InferenceServerException as e:
        # the message starts with a gRPC status name, e.g. "INVALID_ARGUMENT: image ... not a supported format"
        sys.exit(f"pipeline failed: {e.message()}")
    finally:
        client.close()
    first = lambda name: result.as_numpy(name)[0, 0]  # outputs are [1, 1]: batch of one, one value
    print(first("TEXT").decode("utf-8"))
    print(f"finish_reason={first('FINISH_REASON').decode()} prompt_tokens={first('PROMPT_TOKENS')} "
          f"completion_tokens={first('COMPLETION_TOKENS')}")


if __name__ == "__main__":
    main()
