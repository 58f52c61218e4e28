#!/usr/bin/env bash
# Deploy the serving image on a Compute Engine VM with one GPU, least privilege, TLS at the gateway.
#
#   deploy/gcp/deploy.sh --project my-project --allowed-source 203.0.113.0/24 \
#       --tls-cert fullchain.pem --tls-key privkey.pem [--dry-run]
#
# What it does (each step is idempotent; --dry-run prints every command instead of running it):
#  1. enables the APIs; an Artifact Registry repository; builds the CUDA image and pushes it
#     (--image URI skips the build, e.g. for an image that cloudbuild.yaml pushed);
#  2. a dedicated service account with only: roles/artifactregistry.reader on that repository,
#     roles/monitoring.metricWriter and roles/logging.logWriter on the project, and read access to
#     a private bucket holding the TLS certificate and key; the VM gets the matching narrow
#     scopes (storage-ro, monitoring-write, logging-write), never cloud-platform;
#  3. a network of its own (not the project's default network, whose default rules open SSH
#     and RDP to the internet), a firewall rule opening HTTPS (443) to --allowed-source only,
#     updated when it changes (0.0.0.0/0 is refused unless --allow-any-source is given), and SSH
#     from Google's IAP range only (gcloud compute ssh --tunnel-through-iap);
#  4. the VM (GPU type, zone, machine type, boot image are options) whose startup script
#     (startup.sh) installs the NVIDIA driver, Docker with the NVIDIA container toolkit, nginx
#     (TLS, nginx-tls.conf) and the Ops Agent (ops-agent.yaml: scrapes TorchServe's metrics on
#     the VM's loopback into Cloud Monitoring), then runs the container;
#  5. Cloud Monitoring alert policies from monitoring/alerts.yml (once; --skip-alerts to skip).
# Options can also be given as environment variables (PROJECT, ALLOWED_SOURCE, TLS_CERT, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."

PROJECT=${PROJECT:-}
ALLOWED_SOURCE=${ALLOWED_SOURCE:-}
TLS_CERT=${TLS_CERT:-}
TLS_KEY=${TLS_KEY:-}
REGION=${REGION:-europe-west4}
ZONE=${ZONE:-}
VM=${VM:-emotion-serve}
MACHINE_TYPE=${MACHINE_TYPE:-g2-standard-4}      # 4 vCPU, 16 GB: the machine type that carries one L4
GPU_TYPE=${GPU_TYPE:-nvidia-l4}
GPU_COUNT=${GPU_COUNT:-1}
BOOT_IMAGE_FAMILY=${BOOT_IMAGE_FAMILY:-debian-12}
BOOT_IMAGE_PROJECT=${BOOT_IMAGE_PROJECT:-debian-cloud}
BOOT_DISK_SIZE=${BOOT_DISK_SIZE:-50GB}
REPO=${REPO:-emotion}
TAG=${TAG:-}
IMAGE=${IMAGE:-}
DRY_RUN=${DRY_RUN:-}
ALLOW_ANY_SOURCE=${ALLOW_ANY_SOURCE:-}
SKIP_ALERTS=${SKIP_ALERTS:-}

usage() { sed -n '2,26p' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --allowed-source) ALLOWED_SOURCE=$2; shift 2 ;;
    --tls-cert) TLS_CERT=$2; shift 2 ;;
    --tls-key) TLS_KEY=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --vm) VM=$2; shift 2 ;;
    --machine-type) MACHINE_TYPE=$2; shift 2 ;;
    --gpu-type) GPU_TYPE=$2; shift 2 ;;
    --gpu-count) GPU_COUNT=$2; shift 2 ;;
    --boot-image-family) BOOT_IMAGE_FAMILY=$2; shift 2 ;;
    --boot-image-project) BOOT_IMAGE_PROJECT=$2; shift 2 ;;
    --boot-disk-size) BOOT_DISK_SIZE=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --allow-any-source) ALLOW_ANY_SOURCE=1; shift ;;
    --skip-alerts) SKIP_ALERTS=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

fail() { echo "deploy.sh: $*" >&2; exit 1; }
[ -n "$PROJECT" ] || fail "set --project (PROJECT) to your Google Cloud project id"
[ -n "$ALLOWED_SOURCE" ] || fail "set --allowed-source (ALLOWED_SOURCE) to the CIDR ranges allowed to reach the service"
for range in ${ALLOWED_SOURCE//,/ }; do
  [[ "$range" =~ ^[0-9a-fA-F:.]+/[0-9]{1,3}$ ]] || fail "--allowed-source: '$range' is not a CIDR range"
  if [[ "$range" == 0.0.0.0/0 || "$range" == ::/0 ]] && [ -z "$ALLOW_ANY_SOURCE" ]; then
    fail "--allowed-source $range opens the service to the whole internet; add --allow-any-source if you mean it"
  fi
done
[ -n "$TLS_CERT" ] && [ -n "$TLS_KEY" ] || fail "set --tls-cert and --tls-key (PEM files): the gateway serves HTTPS only"
[ -n "$DRY_RUN" ] || { [ -f "$TLS_CERT" ] && [ -f "$TLS_KEY" ]; } || fail "TLS certificate or key file not found"
[[ "$GPU_COUNT" =~ ^[1-8]$ ]] || fail "--gpu-count must be 1 to 8"
ZONE=${ZONE:-${REGION}-a}
TAG=${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}
REGISTRY="${REGION}-docker.pkg.dev"
BUILD_IMAGE=""
if [ -z "$IMAGE" ]; then
  IMAGE="${REGISTRY}/${PROJECT}/${REPO}/emotion-serve:${TAG}"
  BUILD_IMAGE=1
fi
SA_NAME=emotion-serve
SA="${SA_NAME}@${PROJECT}.iam.gserviceaccount.com"
BUCKET="gs://${PROJECT}-emotion-tls"
FIREWALL=emotion-serve-https
NETWORK=${NETWORK:-emotion-serve}
SUBNET_RANGE=${SUBNET_RANGE:-10.80.0.0/24}
IAP_RANGE=35.235.240.0/20   # where Identity-Aware Proxy's TCP forwarding connects from
TARGET_TAG=emotion-serve
G=(gcloud --project "$PROJECT" --quiet)

# A command as one line a shell reads back: words quoted only where they need it.
show() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+="$word "; else line+="'${word//\'/\'\\\'\'}' "; fi
  done
  echo "${line% }"
}
# Every command goes through run: printed in a dry run, executed otherwise.
run() {
  if [ -n "$DRY_RUN" ]; then show "$@"; else "$@"; fi
}
# `exists` is a read-only check; in a dry run it is printed and assumed false (a fresh project).
exists() {
  if [ -n "$DRY_RUN" ]; then echo "$(show "$@")  # exists?"; return 1; fi
  "$@" >/dev/null 2>&1
}

# 1. APIs, registry, image
run "${G[@]}" services enable compute.googleapis.com artifactregistry.googleapis.com \
  monitoring.googleapis.com logging.googleapis.com storage.googleapis.com
exists "${G[@]}" artifacts repositories describe "$REPO" --location "$REGION" \
  || run "${G[@]}" artifacts repositories create "$REPO" --repository-format=docker --location "$REGION"
if [ -n "$BUILD_IMAGE" ]; then
  [ -n "$DRY_RUN" ] || [ -f model_store/emotion.mar ] || fail "model_store/emotion.mar is missing: run make archive"
  # The GPU image: CUDA torch; the full archive, because on a GPU the handler runs PyTorch in fp16.
  run docker/image.sh build --variant cuda --archive model_store/emotion.mar --tag "$IMAGE"
  run docker/image.sh push "$IMAGE" --token-command "gcloud auth print-access-token"
fi

# 2. Service account and its roles (nothing project-wide beyond writing metrics and logs)
exists "${G[@]}" iam service-accounts describe "$SA" \
  || run "${G[@]}" iam service-accounts create "$SA_NAME" --display-name "emotion classifier VM"
run "${G[@]}" artifacts repositories add-iam-policy-binding "$REPO" --location "$REGION" \
  --member "serviceAccount:$SA" --role roles/artifactregistry.reader
for role in roles/monitoring.metricWriter roles/logging.logWriter; do
  run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$SA" --role "$role" --condition=None
done
exists "${G[@]}" storage buckets describe "$BUCKET" \
  || run "${G[@]}" storage buckets create "$BUCKET" --location "$REGION" --uniform-bucket-level-access \
       --public-access-prevention
run "${G[@]}" storage cp "$TLS_CERT" "$BUCKET/tls.crt"
run "${G[@]}" storage cp "$TLS_KEY" "$BUCKET/tls.key"
run "${G[@]}" storage buckets add-iam-policy-binding "$BUCKET" --member "serviceAccount:$SA" \
  --role roles/storage.objectViewer

# 3. Network and firewall: a VPC of its own; HTTPS from ALLOWED_SOURCE only (an existing rule is
#    updated to the current ranges); SSH from IAP only
exists "${G[@]}" compute networks describe "$NETWORK" \
  || run "${G[@]}" compute networks create "$NETWORK" --subnet-mode=custom
exists "${G[@]}" compute networks subnets describe "$NETWORK" --region "$REGION" \
  || run "${G[@]}" compute networks subnets create "$NETWORK" --network "$NETWORK" --region "$REGION" \
       --range "$SUBNET_RANGE"
exists "${G[@]}" compute firewall-rules describe "$NETWORK-iap-ssh" \
  || run "${G[@]}" compute firewall-rules create "$NETWORK-iap-ssh" --network "$NETWORK" --direction=INGRESS \
       --action=ALLOW --rules=tcp:22 --source-ranges="$IAP_RANGE" --target-tags="$TARGET_TAG"
if exists "${G[@]}" compute firewall-rules describe "$FIREWALL"; then
  run "${G[@]}" compute firewall-rules update "$FIREWALL" --allow=tcp:443 --source-ranges="$ALLOWED_SOURCE"
else
  run "${G[@]}" compute firewall-rules create "$FIREWALL" --network "$NETWORK" --direction=INGRESS --action=ALLOW \
    --rules=tcp:443 --source-ranges="$ALLOWED_SOURCE" --target-tags="$TARGET_TAG"
fi

# 4. The VM
metadata_dir=$(mktemp -d)
trap 'rm -rf "$metadata_dir"' EXIT
sed -e "s|@IMAGE@|${IMAGE}|g" -e "s|@REGISTRY@|${REGISTRY}|g" -e "s|@TLS_BUCKET@|${BUCKET#gs://}|g" \
  deploy/gcp/startup.sh > "$metadata_dir/startup.sh"
if exists "${G[@]}" compute instances describe "$VM" --zone "$ZONE"; then
  # A new image or config: replace the startup script and restart the VM, which reruns it (it is
  # idempotent: the driver and runtime are installed once). No SSH access is needed for this.
  # Stop and start, not reset: a stop shuts the guest down, so the container gets its SIGTERM and
  # drains; a reset is a power cycle that drops the requests in flight.
  run "${G[@]}" compute instances add-metadata "$VM" --zone "$ZONE" \
    --metadata-from-file "startup-script=$metadata_dir/startup.sh,ops-agent-config=deploy/gcp/ops-agent.yaml,nginx-tls-config=deploy/gcp/nginx-tls.conf"
  run "${G[@]}" compute instances stop "$VM" --zone "$ZONE"
  run "${G[@]}" compute instances start "$VM" --zone "$ZONE"
else
  # Shielded VM: vTPM and integrity monitoring (measured boot, alerts on a changed boot chain).
  # Secure Boot stays off: the startup script builds the NVIDIA driver with DKMS, and Secure Boot
  # refuses an unsigned kernel module (turning it on needs a driver signed with an enrolled key).
  run "${G[@]}" compute instances create "$VM" --zone "$ZONE" --machine-type "$MACHINE_TYPE" \
    --accelerator "type=${GPU_TYPE},count=${GPU_COUNT}" --maintenance-policy TERMINATE \
    --network "$NETWORK" --subnet "$NETWORK" \
    --image-family "$BOOT_IMAGE_FAMILY" --image-project "$BOOT_IMAGE_PROJECT" \
    --boot-disk-size "$BOOT_DISK_SIZE" --boot-disk-type pd-balanced \
    --no-shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
    --tags "$TARGET_TAG" --service-account "$SA" --scopes storage-ro,monitoring-write,logging-write \
    --metadata enable-oslogin=TRUE \
    --metadata-from-file "startup-script=$metadata_dir/startup.sh,ops-agent-config=deploy/gcp/ops-agent.yaml,nginx-tls-config=deploy/gcp/nginx-tls.conf"
fi

# 5. Alert policies: the rules of monitoring/alerts.yml, evaluated by Cloud Monitoring (PromQL)
if [ -z "$SKIP_ALERTS" ]; then
  existing=""
  if [ -z "$DRY_RUN" ]; then
    existing=$("${G[@]}" monitoring policies list --filter='displayName:Emotion' --format='value(name)' || true)
  fi
  [ -n "$existing" ] || run "${G[@]}" monitoring policies migrate \
    --policies-from-prometheus-alert-rules-yaml=monitoring/alerts.yml
fi

cat <<MSG
VM $VM ($GPU_COUNT x $GPU_TYPE, $MACHINE_TYPE) in $ZONE; the startup script takes a few minutes
(driver, Docker, image pull). Then:
  IP=\$(gcloud --project $PROJECT compute instances describe $VM --zone $ZONE --format='value(networkInterfaces[0].accessConfigs[0].natIP)')
  curl https://<name in the certificate>/ready      (resolving to \$IP)
  KEY=\$(gcloud --project $PROJECT compute ssh $VM --zone $ZONE --tunnel-through-iap --command 'sudo docker exec emotion python -m serving key')
MSG
