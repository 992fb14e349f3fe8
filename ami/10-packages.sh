#!/usr/bin/env bash
# Debian/Ubuntu packages the appliance runs on: NGINX, certbot, the firewall, Python for the
# virtualenv and a C compiler (Triton builds small launcher stubs at run time); the cpu flavour
# adds libnuma, which vLLM's CPU kernels link.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
flavor="${FLAVOR:-gpu}"
case "$flavor" in
    gpu) extra=() ;;
    cpu) extra=(libnuma1) ;;
    *) echo "FLAVOR must be gpu or cpu, not ${flavor}" >&2; exit 1 ;;
esac

apt-get update -qq
apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade
apt-get install -y -qq --no-install-recommends \
    nginx certbot ufw logrotate curl ca-certificates openssl jq \
    python3 python3-venv python3-dev build-essential pciutils "${extra[@]}"
