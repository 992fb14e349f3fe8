#!/usr/bin/env bash
# Bounded logs: the journal (the engine's and the proxy's output) and NGINX's files.
set -euo pipefail
src="${APPLIANCE_SRC:?APPLIANCE_SRC is required}"

install -d -m 0755 /etc/systemd/journald.conf.d /var/log/journal
install -m 0644 "$src/ami/files/journald-appliance.conf" /etc/systemd/journald.conf.d/appliance.conf
install -m 0644 "$src/ami/files/logrotate-nginx-appliance" /etc/logrotate.d/nginx
systemctl restart systemd-journald
