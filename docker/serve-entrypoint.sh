#!/usr/bin/env bash
# Serving container: TorchServe (inference on the container's loopback, port 8085) behind the
# retrying gateway (nginx, published port 8080; see gateway/nginx.conf). The container stops,
# and its restart policy restarts it, when either process stops.
set -uo pipefail
python -m serving.gateway --host 0.0.0.0 --port 8080 --upstream 127.0.0.1:8085 --workdir /tmp/gateway &
torchserve --start --foreground --ncs --ts-config config.properties --models emotion=emotion.mar &
trap 'kill $(jobs -p) 2>/dev/null' TERM INT
wait -n
status=$?
kill $(jobs -p) 2>/dev/null
wait
exit "$status"
