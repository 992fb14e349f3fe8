#!/usr/bin/env bash
# Host firewall: SSH, and HTTP/HTTPS for NGINX (80 also answers ACME challenges). The engine
# and the proxy listen on loopback only; this is the second fence around them.
set -euo pipefail

ufw --force reset >/dev/null
ufw default deny incoming
ufw default allow outgoing
ufw allow 22/tcp
ufw allow 80/tcp
ufw allow 443/tcp
ufw --force enable
ufw status verbose
