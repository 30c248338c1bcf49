"""The Triton side: the contract's names, the adapters' helpers, the serving manifest, the
tritonserver launcher and its supervisor, and the pipeline client."""
