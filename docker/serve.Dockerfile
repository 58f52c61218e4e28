# TorchServe image serving model_store/emotion.mar (build it first: make archive).
#   docker build -f docker/serve.Dockerfile -t emotion-serve .
#   docker run --gpus all -p 8080:8080 -p 8082:8082 emotion-serve        (--gpus needs the NVIDIA toolkit)
# Without Docker Hub, build a base with docker/build-base.sh and pass --build-arg BASE_IMAGE=localhost/debian-python.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv
COPY requirements-serve.txt .
# PyPI's Linux torch wheel carries CUDA: the same image runs on CPU and on a GPU VM.
RUN pip install --no-cache-dir -r requirements-serve.txt

COPY docker/config.properties config.properties
COPY monitoring/metrics.yaml monitoring/metrics.yaml
COPY model_store/emotion.mar model_store/emotion.mar

RUN useradd --system --home /srv serve && chown -R serve /srv
USER serve
# Inference and metrics are published; management stays on the container's loopback.
EXPOSE 8080 8082
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import json,urllib.request as u; k=json.load(open('key_file.json'))['inference']['key']; r=u.Request('http://127.0.0.1:8080/ping', headers={'Authorization':'Bearer '+k}); u.urlopen(r, timeout=4)"
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties", "--models", "emotion=emotion.mar"]
