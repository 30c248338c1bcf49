"""The generation engine (see core.py): scheduler -> runner (prefill, decode) -> output stage; and the
encoder (encoder.py), the prefill-only forward of the embedding and reranking models.

Its settings (config.py) import without torch; the engine's classes load on first use, so the serving
manifest and the export side can read an EngineConfig without loading the engine."""
from importlib import import_module

from shelfsight.engine.config import PRESETS, DevicePreset, EncoderConfig, EngineConfig, preset

_LAZY = {"Engine": "core", "Encoder": "encoder", "Observer": "api", "Prompt": "api", "Request": "api",
         "SafeObserver": "api", "Sink": "api", "VisionCache": "prefill"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"shelfsight.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'shelfsight.engine' has no attribute {name!r}")


__all__ = ["PRESETS", "DevicePreset", "Encoder", "EncoderConfig", "Engine", "EngineConfig", "Observer", "Prompt",
           "Request", "SafeObserver", "Sink", "VisionCache", "preset"]
