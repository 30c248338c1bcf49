"""shelfsight's Python client: `ShelfsightClient` (sync) and `AsyncShelfsightClient` (asyncio), for
answers (ProductVision) and catalog search (Catalog)."""
from shelfsight.client.catalog import CatalogInfo, CatalogItem, Hit, IndexResult, SearchResult
from shelfsight.client.client import AsyncShelfsightClient, Chunk, Recognition, ShelfsightClient

__all__ = ["AsyncShelfsightClient", "CatalogInfo", "CatalogItem", "Chunk", "Hit", "IndexResult", "Recognition",
           "SearchResult", "ShelfsightClient"]
