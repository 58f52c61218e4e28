# TorchServe image serving model_store/emotion.mar (build it first: make archive).
#   docker build -f docker/serve.Dockerfile -t emotion-serve .
#   docker run --gpus all -p 8080:8080 -p 8082:8082 emotion-serve        (--gpus needs the NVIDIA toolkit)
# Without Docker Hub, build a base with docker/build-base.sh and pass --build-arg BASE_IMAGE=localhost/debian-python.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless nginx \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv
COPY requirements-serve.txt .
# PyPI's Linux torch wheel carries CUDA: the same image runs on CPU and on a GPU VM.
RUN pip install --no-cache-dir -r requirements-serve.txt requests

COPY docker/config.properties config.properties
COPY monitoring/metrics.yaml monitoring/metrics.yaml
COPY serving/__init__.py serving/server.py serving/gateway.py serving/log4j2.xml serving/
COPY gateway/nginx.conf gateway/nginx.conf
COPY docker/serve-entrypoint.sh serve-entrypoint.sh
COPY model_store/emotion.mar model_store/emotion.mar

RUN useradd --system --home /srv serve && chown -R serve /srv
USER serve
# Inference (through the retrying gateway) and metrics are published; TorchServe's own inference
# port and the management API stay on the container's loopback.
EXPOSE 8080 8082
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import json,urllib.request as u; k=json.load(open('key_file.json'))['inference']['key']; r=u.Request('http://127.0.0.1:8080/ping', headers={'Authorization':'Bearer '+k}); u.urlopen(r, timeout=4)"
CMD ["./serve-entrypoint.sh"]
