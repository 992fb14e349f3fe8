#!/usr/bin/env bash
# Debian/Ubuntu packages the appliance runs on: NGINX, certbot, the firewall, Python for the
# virtualenv and a C compiler (Triton builds small launcher stubs at run time).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade
apt-get install -y -qq --no-install-recommends \
    nginx certbot ufw logrotate curl ca-certificates openssl jq \
    python3 python3-venv python3-dev build-essential pciutils
