"""shelfsight's web UI (`shelfsight ui`): a Gradio workbench over the gateway's ProductVision API.

It is a client of the gateway and nothing more: every answer comes through shelfsight.client, batches
through the same resumable code as `shelfsight batch`, evaluations through `shelfsight eval`'s code.
"""
