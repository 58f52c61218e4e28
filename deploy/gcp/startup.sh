#!/usr/bin/env bash
# Startup script of the GPU VM (deploy.sh fills in @IMAGE@, @REGISTRY@ and @TLS_BUCKET@). It runs
# as root at every boot; each step is skipped when already done, so a rerun only pulls the
# image and replaces the container. Credentials come from the VM's service account through the
# metadata server: no key file is stored on the VM.
set -euo pipefail
IMAGE="@IMAGE@"
REGISTRY="@REGISTRY@"
TLS_BUCKET="@TLS_BUCKET@"
STATE=/var/lib/emotion
export DEBIAN_FRONTEND=noninteractive

metadata() { curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/$1"; }
token() {
  metadata instance/service-accounts/default/token | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
mkdir -p "$STATE"

# 1. NVIDIA driver from Debian's non-free archive (skipped where nvidia-smi works already, e.g. on
#    a Deep Learning VM boot image). The first install blacklists nouveau, so the VM reboots once.
#    The headers come with the kernel flavour's metapackage (linux-headers-cloud-amd64 on Google's
#    Debian images), so that DKMS rebuilds the driver for each kernel the unattended security
#    updates install; a boot into a kernel without it gets its module built here.
KERNEL_FLAVOUR=$(uname -r | sed 's/^[0-9.]*-[0-9]*-//')
if ! nvidia-smi >/dev/null 2>&1; then
  if [ -f "$STATE/driver-installed" ]; then
    echo "nvidia-smi fails: building the driver for kernel $(uname -r)" >&2
    apt-get update
    apt-get install -y --no-install-recommends "linux-headers-$(uname -r)" "linux-headers-${KERNEL_FLAVOUR}"
    dkms autoinstall -k "$(uname -r)" && modprobe nvidia || true
    if ! nvidia-smi >/dev/null 2>&1; then
      echo "the NVIDIA driver is installed but nvidia-smi still fails on kernel $(uname -r)" >&2
      exit 1
    fi
  else
    sed -i 's/^Components: main$/Components: main contrib non-free non-free-firmware/' /etc/apt/sources.list.d/*.sources
    apt-get update
    apt-get install -y --no-install-recommends "linux-headers-$(uname -r)" "linux-headers-${KERNEL_FLAVOUR}" \
      nvidia-driver firmware-misc-nonfree
    touch "$STATE/driver-installed"
    systemctl reboot
    exit 0
  fi
fi

# 2. Container runtime: Docker and NVIDIA's container toolkit (the `--gpus` flag).
if ! command -v docker >/dev/null || ! command -v nvidia-ctk >/dev/null; then
  apt-get update
  apt-get install -y --no-install-recommends docker.io gnupg curl ca-certificates
  curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \
    | gpg --batch --yes --dearmor -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
  curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
    | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#' \
    > /etc/apt/sources.list.d/nvidia-container-toolkit.list
  apt-get update
  apt-get install -y --no-install-recommends nvidia-container-toolkit
  nvidia-ctk runtime configure --runtime=docker
  systemctl restart docker
fi

# 3. Telemetry: the Ops Agent scrapes TorchServe's and the gateway's Prometheus endpoints on the
#    VM's loopback (ops-agent.yaml, from the instance metadata) into Cloud Monitoring.
#    No installer script runs as root: Google's apt repository is added with its signing key, so
#    apt verifies the agent's package signature before installing it.
if ! systemctl is-enabled --quiet google-cloud-ops-agent 2>/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
    | gpg --batch --yes --dearmor -o /usr/share/keyrings/google-cloud-ops-agent.gpg
  . /etc/os-release
  echo "deb [signed-by=/usr/share/keyrings/google-cloud-ops-agent.gpg] https://packages.cloud.google.com/apt google-cloud-ops-agent-${VERSION_CODENAME}-all main" \
    > /etc/apt/sources.list.d/google-cloud-ops-agent.list
  apt-get update
  apt-get install -y --no-install-recommends google-cloud-ops-agent
fi
metadata instance/attributes/ops-agent-config > /tmp/ops-agent.yaml
if ! cmp -s /tmp/ops-agent.yaml /etc/google-cloud-ops-agent/config.yaml; then
  install -m 644 /tmp/ops-agent.yaml /etc/google-cloud-ops-agent/config.yaml
  systemctl restart google-cloud-ops-agent
fi

# 4. TLS proxy: nginx with the operator's certificate and key (private bucket, readable by
#    this VM's service account only), proxying to the gateway on the VM's loopback.
command -v nginx >/dev/null || { apt-get update && apt-get install -y --no-install-recommends nginx; }
install -d -m 700 /etc/nginx/tls
for object in tls.crt tls.key; do
  curl -fsS -H "Authorization: Bearer $(token)" -o "/etc/nginx/tls/$object.new" \
    "https://storage.googleapis.com/storage/v1/b/${TLS_BUCKET}/o/${object}?alt=media"
  chmod 600 "/etc/nginx/tls/$object.new"
  mv "/etc/nginx/tls/$object.new" "/etc/nginx/tls/$object"
done
metadata instance/attributes/nginx-tls-config > /etc/nginx/conf.d/emotion-tls.conf
rm -f /etc/nginx/sites-enabled/default
nginx -t
systemctl enable nginx
systemctl reload-or-restart nginx

# 5. The service, on a bridge network of its own: the gateway (8080) and the metrics ports (8082
#    TorchServe, 8083 the gateway) are published on the VM's loopback only (only nginx listens
#    outside); the container cannot reach the metadata server, so a compromised worker gets no
#    token for the bucket that holds tls.key (read above, at install, by the VM itself); its root
#    file system is read-only (tmpfs for /tmp and the logs folder), with no capability and no
#    privilege gain. Requests reach it from nginx through Docker's proxy, which is the network's
#    gateway address: the one proxy whose X-Forwarded-For the gateway trusts. Logs go to Cloud
#    Logging; the gateway keys live in the emotion-state volume and survive restarts.
NETWORK_SUBNET=172.30.0.0/24
NETWORK_GATEWAY=172.30.0.1
docker network inspect emotion >/dev/null 2>&1 \
  || docker network create --subnet "$NETWORK_SUBNET" --gateway "$NETWORK_GATEWAY" emotion
iptables -C DOCKER-USER -s "$NETWORK_SUBNET" -d 169.254.169.254 -j DROP 2>/dev/null \
  || iptables -I DOCKER-USER -s "$NETWORK_SUBNET" -d 169.254.169.254 -j DROP
token | docker login --username oauth2accesstoken --password-stdin "https://${REGISTRY}"
docker pull "$IMAGE"
# The old container is stopped, not killed: SIGTERM drains it (readiness drops, in-flight requests
# are answered). 140 s covers the drain, the gateway's longest request (3 x responseTimeout +
# 5 s = 95 s) and TorchServe's stop (30 s).
docker stop --time 140 emotion 2>/dev/null || true
docker rm emotion 2>/dev/null || true
docker run -d --name emotion --restart unless-stopped --gpus all --network emotion --stop-timeout 140 \
  --publish 127.0.0.1:8080:8080 --publish 127.0.0.1:8082:8082 --publish 127.0.0.1:8083:8083 \
  --read-only --tmpfs /tmp:rw,size=2g --tmpfs /srv/logs:rw,size=512m \
  --cap-drop ALL --security-opt no-new-privileges --env TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
  --log-driver gcplogs -v emotion-state:/srv/outputs "$IMAGE" \
  --trusted-proxy "$NETWORK_GATEWAY" --metrics-host 0.0.0.0 --host 0.0.0.0
# Images no container uses any more (earlier releases), once a week old: each is several GB, and
# the boot disk holds 50 GB.
docker image prune --all --force --filter "until=168h" || true
