#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use, if missing, and starts a
# Docker engine if none answers. Idempotent; needs root (CI runs as root).
set -euo pipefail

packages=(nginx docker.io busybox-static openssl wrk prometheus-blackbox-exporter prometheus-alertmanager systemd docker-compose debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts nginx on install where it can; the tests run their own.
pkill -x nginx 2>/dev/null || true

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (no bridge, no iptables: containers use host networking)"
  mkdir -p /var/log
  nohup dockerd --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
    >/var/log/autoserve-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/autoserve-dockerd.log" >&2; exit 1; }
fi
echo "system ready: docker $(docker version --format '{{.Server.Version}}'), $(nginx -v 2>&1)"
