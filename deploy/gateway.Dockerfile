# The gateway and the `shelfsight` command line (ask, batch, loadtest) without the model stack: only the
# packages the gateway and client import, at the versions pinned in requirements/serve.txt.
# Build from the repository root:  docker build -f deploy/gateway.Dockerfile -t shelfsight-gateway .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/shelfsight
COPY requirements/serve.txt requirements/serve.txt
# One list of pins: take the gateway's packages from serve.txt rather than keeping a second copy.
RUN grep -E '^(numpy|pillow|tritonclient|grpcio|grpcio-tools|grpcio-health-checking|grpcio-reflection|prometheus-client|imagehash|redis|tqdm|psycopg|psycopg-pool|pgvector)(\[.*\])?(==|>=)' \
        requirements/serve.txt > /tmp/gateway.txt \
    && pip install -r /tmp/gateway.txt
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
RUN pip install --no-deps -e . && shelfsight gateway --help >/dev/null \
    && useradd --system --uid 10001 shelfsight
USER 10001
# gRPC 50051, metrics 9464
EXPOSE 50051 9464
ENTRYPOINT ["shelfsight"]
CMD ["gateway", "--host", "0.0.0.0", "--triton", "triton:8001"]
