#!/usr/bin/env bash
# The dedicated system user the engine and the proxy run as, and the directories they own.
set -euo pipefail

if ! id appliance >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/appliance --no-create-home \
        --shell /usr/sbin/nologin --user-group appliance
fi
# GPU device nodes are group "video" on some drivers' udev rules.
usermod -a -G video appliance

install -d -m 0750 -o root -g appliance /etc/appliance
install -d -m 0700 -o root -g root /etc/appliance/tls
install -d -m 0750 -o appliance -g appliance /var/lib/appliance /var/lib/appliance/models
install -d -m 0750 -o appliance -g appliance /var/cache/appliance
