# syntax=docker/dockerfile:1
# The serving image: TorchServe behind the retrying gateway, one process tree under tini.
#
#   make image                         CPU image, built by docker/image.sh (debootstrap base, local torch wheel)
#   make image-smoke                   ...then started, asked for a prediction on 127.0.0.1, stopped
#   docker build -f docker/serve.Dockerfile --build-arg VARIANT=cuda \
#       --build-arg ARCHIVE=model_store/emotion.mar -t emotion-serve:cuda .     GPU VM / GKE GPU pool
#
# The gateway is port 8080 (keyless /live and /ready, keyed /predictions/emotion).
# TorchServe's own listeners (inference 8085, management 8081, metrics 8082) stay on the
# container's loopback unless a deployment overrides them (TS_METRICS_ADDRESS, see deploy/k8s/).
# The base image, by digest (no default: a tag alone could change under a rebuild). Cloud Build
# pins debian:bookworm-slim by the digest it resolves (cloudbuild.yaml, step base); docker/image.sh
# passes its own base, made with debootstrap from Debian's signed archive.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.base.name="${BASE_IMAGE}"

# Python packages in two installs. First torch alone, by its exact version: cpu, torch's CPU wheel
# (without its dependencies), from docker/stage/wheels (filled by docker/image.sh from the host's
# pip configuration) or else from TORCH_INDEX, which is then the only index of that one install
# (never an extra index beside PyPI: no name can be taken from the wrong index); cuda, PyPI's
# torch with the CUDA runtime packages it pins (the host needs only the NVIDIA driver and container
# toolkit). Then everything else from requirements-serve.lock with --require-hashes: one version
# of each package and the SHA-256 of its files on PyPI (make lock; docker/lock.py). docker/stage
# is bind-mounted for this step only: the wheels and, behind a TLS-inspecting proxy, the CA bundle
# pip must trust.
ARG VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG ARCHIVE=model_store/emotion.mar

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System layer. Unpinned on purpose: the bookworm suite only takes security and point-release
# fixes, and a pinned version disappears from the mirror at the next one, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv openjdk-17-jre-headless nginx libnginx-mod-http-lua tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 serve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /srv --shell /usr/sbin/nologin serve

# Dependency layer: changes only with requirements-serve.txt and its lock.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY requirements-serve.txt requirements-serve.lock /tmp/
# $TORCH is requirements-serve.txt's torch==<version> line: pinned, in a variable hadolint cannot read.
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/stage,target=/tmp/stage \
    python3 -m venv "$VIRTUAL_ENV" \
 && if [ -f /tmp/stage/ca-bundle.crt ]; then export PIP_CERT=/tmp/stage/ca-bundle.crt; fi \
 && TORCH="$(grep -m1 '^torch==' /tmp/requirements-serve.txt)" \
 && if [ "$VARIANT" = cpu ] && [ -n "$TORCH_INDEX" ]; then \
      pip install --no-deps --index-url "$TORCH_INDEX" "$TORCH"; \
    elif [ "$VARIANT" = cpu ]; then \
      pip install --no-deps --no-index --find-links /tmp/stage/wheels "$TORCH"; \
    else pip install "$TORCH"; fi \
 && pip install --require-hashes --no-deps -r /tmp/requirements-serve.lock \
 && pip check \
 && python -c "import torch; v = torch.__version__; assert ('+cpu' in v) == ('$VARIANT' == 'cpu'), v" \
 && rm /tmp/requirements-serve.txt /tmp/requirements-serve.lock

# Code layer.
WORKDIR /srv
# project.py anchors serving/'s paths at /srv (the glob keeps images of older trees buildable);
# the gateway reads its timeouts from handler/model-config.yaml.
COPY docker/config.properties project.py ./
# The gateway reads its timeouts from model-config.yaml; the feedback service reads the request
# log and answers errors with the handler's own modules (standard library only).
COPY handler/model-config.yaml handler/emotion_errors.py handler/emotion_inputs.py handler/emotion_monitor.py handler/
# The feedback service scores live quality with monitoring/quality.py (NumPy only).
COPY monitoring/__init__.py monitoring/quality.py monitoring/metrics.yaml monitoring/
COPY serving/ serving/
COPY --chmod=755 docker/serve-entrypoint.sh serve-entrypoint.sh
# Model layer last: a new model rebuilds only this layer.
COPY ${ARCHIVE} model_store/emotion.mar
RUN mkdir -p outputs logs && chown 10001:10001 outputs logs .

# TINI_SUBREAPER: tini reaps orphans also where a runner, not tini, is PID 1 (buildah run).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TINI_SUBREAPER=1
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8080/ready', timeout=4).status != 200)"]
ENTRYPOINT ["/usr/bin/tini", "--", "/srv/serve-entrypoint.sh"]
