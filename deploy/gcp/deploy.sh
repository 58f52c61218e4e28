#!/usr/bin/env bash
# Deploy the serving image on a GPU VM in Google Cloud Compute Engine.
#
#   PROJECT=my-project ALLOWED_SOURCE=203.0.113.0/24 deploy/gcp/deploy.sh
#
# 1. builds docker/serve.Dockerfile and pushes it to Artifact Registry;
# 2. creates (once) a firewall rule opening inference (8080) and metrics (8082) to ALLOWED_SOURCE only;
# 3. creates a VM with one GPU from a Deep Learning VM image (NVIDIA driver and Docker included)
#    whose startup script pulls the image and runs it with --gpus all.
# Management (8081) is never published: operate with `gcloud compute ssh` + `docker exec`.
set -euo pipefail

: "${PROJECT:?set PROJECT to your Google Cloud project id}"
: "${ALLOWED_SOURCE:?set ALLOWED_SOURCE to the CIDR allowed to reach the service, e.g. your office range}"
REGION=${REGION:-europe-west4}
ZONE=${ZONE:-${REGION}-a}
VM=${VM:-emotion-serve}
MACHINE=${MACHINE:-g2-standard-4}          # 4 vCPU, 16 GB, one NVIDIA L4
ACCELERATOR=${ACCELERATOR:-type=nvidia-l4,count=1}
REPO=${REPO:-emotion}
TAG=${TAG:-$(git rev-parse --short HEAD)}
IMAGE="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/emotion-serve:${TAG}"

cd "$(dirname "$0")/../.."
[ -f model_store/emotion.mar ] || { echo "model_store/emotion.mar is missing: run make archive" >&2; exit 1; }

gcloud config set project "$PROJECT"
gcloud artifacts repositories describe "$REPO" --location "$REGION" >/dev/null 2>&1 \
  || gcloud artifacts repositories create "$REPO" --repository-format=docker --location "$REGION"
gcloud auth configure-docker "${REGION}-docker.pkg.dev" --quiet
docker build -f docker/serve.Dockerfile -t "$IMAGE" .
docker push "$IMAGE"

gcloud compute firewall-rules describe emotion-serve >/dev/null 2>&1 \
  || gcloud compute firewall-rules create emotion-serve --allow=tcp:8080,tcp:8082 \
       --source-ranges="$ALLOWED_SOURCE" --target-tags=emotion-serve

startup=$(sed "s|@IMAGE@|${IMAGE}|g; s|@REGION@|${REGION}|g" deploy/gcp/startup.sh)
gcloud compute instances create "$VM" --zone "$ZONE" --machine-type "$MACHINE" \
  --accelerator "$ACCELERATOR" --maintenance-policy TERMINATE \
  --image-family common-cu124-debian-11 --image-project deeplearning-platform-release \
  --boot-disk-size 100GB --tags emotion-serve --scopes cloud-platform \
  --metadata "install-nvidia-driver=True,startup-script=${startup}"

echo "VM $VM is starting; inference will answer on http://<external IP>:8080/predictions/emotion"
echo "inference key: gcloud compute ssh $VM --zone $ZONE -- sudo docker exec emotion cat /srv/key_file.json"
