"""The composition root: the `shelfsight` command line, `serve` / `triton` (Triton under its supervisor,
the gateway and the web UI in one process) and the demo put the parts together. Nothing imports it."""
