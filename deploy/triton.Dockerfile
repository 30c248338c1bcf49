# Triton + shelfsight's models: NVIDIA's image carries the real tritonserver and its Python backend;
# shelfsight (the engine the thin model.py adapters import) is installed into the Python the backend's
# stub runs. The model repository is not baked in: `shelfsight export repository` lays it out at start
# (the Kubernetes init container, or the compose file's one-shot service) for the mounted checkpoint.
# Build from the repository root:  docker build -f deploy/triton.Dockerfile -t shelfsight-triton .
ARG TRITON_VERSION=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# The image's Ubuntu marks its Python as externally managed; this image exists to host these packages.
# (DL3064 reads "TOKEN" in TOKENIZERS_PARALLELISM as a secret; it is the tokenizers' thread switch.)
# hadolint ignore=DL3064
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /opt/shelfsight
# Pins first, so code changes do not reinstall torch. numpy stays < 2 for the stub (requirements/serve.txt).
COPY requirements/serve.txt requirements/serve.txt
RUN pip install -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY shelfsight shelfsight
COPY export export
COPY gateway gateway
COPY catalog catalog
COPY client client
COPY loadtest loadtest
COPY ui ui
COPY evaluation evaluation
COPY app app
COPY model_repository model_repository
# Editable: `shelfsight export repository` reads its templates from model_repository/ beside the code.
RUN pip install --no-deps -e . && shelfsight --help >/dev/null

# gRPC 8001 (the gateway), HTTP 8000 (health probes), metrics 8002 (Prometheus)
EXPOSE 8000 8001 8002
# the image's unprivileged triton-server user
USER 1000
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/repository", "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002"]
