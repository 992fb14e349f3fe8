#!/usr/bin/env bash
# The appliance's systemd units and NGINX's drop-in, enabled for boot. Certificate renewal is
# certbot's own timer (enable-tls.sh adds the deploy hook that reloads NGINX). The idle check's
# timer is always on: it does nothing unless APPLIANCE_IDLE_STOP_MINUTES is set.
set -euo pipefail
src="${APPLIANCE_SRC:?APPLIANCE_SRC is required}"

install -m 0644 "$src"/systemd/appliance-*.service "$src"/systemd/appliance-*.timer \
    /etc/systemd/system/
install -d -m 0755 /etc/systemd/system/nginx.service.d
install -m 0644 "$src/systemd/nginx.service.d/appliance.conf" \
    /etc/systemd/system/nginx.service.d/appliance.conf
systemctl daemon-reload
systemctl enable appliance-firstboot.service appliance-firstboot-tls.service \
    appliance-engine.service appliance-proxy.service nginx.service certbot.timer \
    appliance-idle-stop.timer appliance-spot-watch.service
