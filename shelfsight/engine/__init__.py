"""The generation engine (see core.py): scheduler -> runner (prefill, decode) -> output stage."""
from shelfsight.engine.api import EngineConfig, Observer, Request, SafeObserver, Sink
from shelfsight.engine.core import Engine
from shelfsight.engine.prefill import VisionCache

__all__ = ["Engine", "EngineConfig", "Observer", "Request", "SafeObserver", "Sink", "VisionCache"]
