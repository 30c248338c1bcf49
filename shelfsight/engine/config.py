"""The engine's settings and the per-device presets. No torch import: the serving manifest and the
export side read these without loading the engine."""
from __future__ import annotations

from dataclasses import dataclass

from shelfsight.errors import InvalidArgument


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # rows decoded together = KV-cache slots
    max_waiting: int = 256  # queued beyond the running batch; more is refused (RESOURCE_EXHAUSTED)
    max_prefill_tokens: int = 8192  # prompt tokens admitted at once (at least one request)
    # slot runner: prompt tokens prefilled between two decode steps (a longer prompt continues in the
    # next iteration), so a burst of new prompts does not stall the running streams for long (their
    # pictures still go through the vision tower at admission, all at once); 0 = no limit
    prefill_chunk_tokens: int = 512
    # prompt + answer, and the length of every KV-cache slot: the cache holds max_batch + 1 slots of
    # this many tokens per layer, allocated once (2B shape, bf16: 112 KiB a token, 15 GB at 32 x 4096)
    max_model_len: int = 4096
    vision_cache_bytes: int = 256 << 20  # vision features kept for repeated pictures; 0 = off
    runner: str = "slots"  # slots: fixed KV slots + compact decoder | reference: transformers DynamicCache
    cuda_graphs: bool = True  # capture decode steps on CUDA (ignored on CPU)
    warm_kv_len: int = 1024  # on CUDA, capture every batch bucket up to this KV length at start
    # int4 weights: from how many rows a matmul uses a dequantized copy instead of tinygemm (which does
    # not hold at large batch). -1: measured at start on CUDA (model/qlinear.py choose_int4_threshold;
    # tinygemm everywhere on CPU); 0: never (no copy); n: from n rows. The copy costs 2 bytes a weight
    # (bf16): +2.8 GB next to 0.75 GB of int4 for the 2B text decoder.
    int4_dense_from: int = -1
    # A stream gets at most one response per interval (the first token and the last at once): each
    # response, and each cancellation check, is a round trip through Triton's stub IPC. Per token, at
    # 32 streams, they made a step 13.8 ms through Triton against 3.7 ms in process (H100, 2B bf16);
    # measured through Triton at c=32: every token 15.1 req/s, 20 ms 28.0 req/s, 50 ms 34.7 req/s.
    # 50 ms is 20 updates a second: still a smooth stream to a person.
    stream_interval: float = 0.05

    def __post_init__(self):
        for name in ("max_batch", "max_model_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"engine {name} must be at least 1, got {getattr(self, name)}")
        if self.prefill_chunk_tokens < 0:
            raise InvalidArgument(f"engine prefill_chunk_tokens must be 0 (no limit) or more, got {self.prefill_chunk_tokens}")
        if self.int4_dense_from < -1:
            raise InvalidArgument(f"engine int4_dense_from must be -1 (measured), 0 (never) or a row count, "
                                  f"got {self.int4_dense_from}")


@dataclass(frozen=True)
class EncoderConfig:
    """The embedding and reranking models (engine/encoder.py): prefill only, many prompts in one forward."""
    max_batch_tokens: int = 8192  # padded prompt tokens in one forward (rows x the longest prompt)
    max_len: int = 4096  # tokens of one prompt (pictures included)
    dimensions: int = 0  # the embedding's default Matryoshka size; 0 = the model's full width
    vision_cache_bytes: int = 64 << 20  # features of recent pictures (a query photo reranked against N items)


@dataclass(frozen=True)
class DevicePreset:
    """Where the engine runs and the engine sizes that suit it; `export repository --device` picks one."""
    device: str  # torch device type: cpu | cuda
    # On CPU, bf16 matmuls round differently with batch shape, so answers could depend on what else is
    # batched; fp32 keeps them batch-invariant there. GPUs compute in bf16.
    dtype: str
    engine: EngineConfig
    encoder: EncoderConfig = EncoderConfig()


PRESETS = {
    "cpu": DevicePreset("cpu", "float32", EngineConfig(max_prefill_tokens=4096, vision_cache_bytes=256 << 20),
                        EncoderConfig(max_batch_tokens=8192)),
    "gpu": DevicePreset("cuda", "bfloat16", EngineConfig(max_prefill_tokens=16_384, vision_cache_bytes=1 << 30),
                        EncoderConfig(max_batch_tokens=32_768, vision_cache_bytes=256 << 20)),
}


def preset(name: str) -> DevicePreset:
    if name not in PRESETS:
        raise InvalidArgument(f"--device must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]
