#!/usr/bin/env bash
# The NGINX site, rendered from nginx/ by appliance_ops/render_site.py into /etc/nginx/appliance
# and enabled in place of Debian's default site. First boot makes the real certificate; a
# throw-away one lets `nginx -t` check the site now and in 90-check.sh, and 99-cleanup.sh removes
# it with everything else in /etc/appliance/tls.
set -euo pipefail
prefix=/usr/local/lib/appliance
site_dir=/etc/nginx/appliance
tls=/etc/appliance/tls

python3 "$prefix/appliance_ops/render_site.py" --out-dir "$site_dir" \
    --cert "$tls/self-signed.crt" --key "$tls/self-signed.key"
ln -sfn "$site_dir/appliance.conf" /etc/nginx/sites-enabled/appliance
rm -f /etc/nginx/sites-enabled/default

if [ ! -s "$tls/self-signed.crt" ]; then
    "$prefix/appliance_ops/tools/make-self-signed.sh" "$tls/self-signed.crt" "$tls/self-signed.key" \
        image-build
fi
nginx -t
