"""shelfsight's Python client: `ShelfsightClient` (sync) and `AsyncShelfsightClient` (asyncio)."""
from shelfsight.client.client import AsyncShelfsightClient, Chunk, Recognition, ShelfsightClient

__all__ = ["AsyncShelfsightClient", "Chunk", "Recognition", "ShelfsightClient"]
