#!/usr/bin/env bash
# The serving container's command: the whole service in the foreground, as `serving.stack run`
# starts it (TorchServe on the container's loopback, the retrying gateway on 0.0.0.0:8080, both
# stopped on SIGTERM). Arguments are appended, so a deployment can override them, e.g.
# `--host 127.0.0.1` behind a TLS proxy or `--keys-file /etc/emotion/keys/keys.json`.
set -euo pipefail
cd /srv
if [ -f serving/stack.py ]; then
  exec python -m serving.stack run --host 0.0.0.0 --port 8080 "$@"
fi

# Images built before serving/stack.py existed: TorchServe and the gateway as two processes
# (no /live or /ready; the inference key is TorchServe's own, in /srv/key_file.json).
python -m serving.gateway --host 0.0.0.0 --port 8080 --upstream 127.0.0.1:8085 --workdir /tmp/gateway &
torchserve --start --foreground --ncs --ts-config config.properties --models emotion=emotion.mar &
trap 'kill $(jobs -p) 2>/dev/null' TERM INT
status=0
wait -n || status=$?
kill $(jobs -p) 2>/dev/null || true
wait || true
exit "$status"
