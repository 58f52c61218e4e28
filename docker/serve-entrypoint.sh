#!/usr/bin/env bash
# The serving container's command: the whole service in the foreground, as `serving run`
# starts it (TorchServe on the container's loopback, the gateway on 0.0.0.0:8080, both
# stopped on SIGTERM: readiness drops first, requests in flight finish). Arguments are appended,
# so a deployment can override them, e.g. `--host 127.0.0.1` behind a TLS proxy or
# `--keys-file /etc/emotion/keys/keys.json`.
set -euo pipefail
cd /srv
exec python -m serving run --host 0.0.0.0 "$@"
