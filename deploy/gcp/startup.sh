#!/usr/bin/env bash
# VM startup script (deploy.sh fills in @IMAGE@ and @REGION@): run the serving container on the GPU.
set -euo pipefail
gcloud auth configure-docker "@REGION@-docker.pkg.dev" --quiet
docker pull "@IMAGE@"
docker rm -f emotion 2>/dev/null || true
docker run -d --name emotion --restart unless-stopped --gpus all -p 8080:8080 -p 8082:8082 "@IMAGE@"
