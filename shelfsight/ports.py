"""The well-known addresses, named once. Every command's defaults come from here through the settings
objects; monitoring/prometheus.yml and deploy/ use the same numbers (tests/test_deploy.py checks)."""
LOCALHOST = "127.0.0.1"
GATEWAY = 50051  # the ProductVision gRPC API
GATEWAY_METRICS = 9464  # the gateway's Prometheus /metrics
GATEWAY_HTTP = 8080  # the OpenAI-compatible HTTP API, where the docs and deploy/ turn it on (off by default)
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002  # tritonserver's own defaults
UI = 7860  # the web workbench (Gradio's usual port)


def local(port: int) -> str:
    return f"{LOCALHOST}:{port}"


GATEWAY_ADDRESS = local(GATEWAY)  # what clients dial by default
TRITON_ADDRESS = local(TRITON_GRPC)  # what the gateway dials by default
