#!/usr/bin/env bash
# Leaves nothing instance-specific in the image: each instance makes its own SSH host keys,
# settings, certificate and API keys at first boot (cloud-init and appliance-firstboot).
set -euo pipefail

rm -rf /var/tmp/appliance-src /root/.cache/pip
apt-get -y -qq autoremove
apt-get clean
rm -rf /var/lib/apt/lists/*

rm -f /etc/appliance/appliance.env /etc/appliance/admin-key
rm -f /etc/appliance/tls/*
rm -f /var/lib/appliance/firstboot.done /var/lib/appliance/firstboot-tls.done
rm -f /var/lib/appliance/keys.db*
rm -f /etc/ssh/ssh_host_*
cloud-init clean --logs --seed 2>/dev/null || true
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -f /root/.bash_history /home/*/.bash_history
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
