#!/usr/bin/env bash
# Switch the appliance's HTTPS site from its self-signed certificate to one from Let's Encrypt
# (or another ACME server), and make renewals reload NGINX.
#
#   enable-tls.sh [--server URL] [--] DOMAIN EMAIL
#
# certbot's webroot method answers the HTTP-01 challenge through the running NGINX, so nothing
# stops serving. If issuance or the new configuration fails, the site keeps its current
# certificate. Running it again is harmless: certbot keeps a certificate that is not yet due.
#
# Environment (defaults suit the production host):
#   APPLIANCE_NGINX_DIR    the rendered site (appliance_ops/render_site.py --out-dir)
#                          [/etc/nginx/appliance]
#   APPLIANCE_NGINX_ARGS   extra arguments for `nginx -t` and `nginx -s reload`, e.g. "-p DIR -c FILE"
#   APPLIANCE_CERTBOT_DIR  keep certbot's config, work and logs under this directory instead of
#                          certbot's system directories
set -euo pipefail

render_site=$(cd "$(dirname "$0")/.." && pwd)/render_site.py
site_dir=${APPLIANCE_NGINX_DIR:-/etc/nginx/appliance}
read -r -a nginx_args <<<"${APPLIANCE_NGINX_ARGS:-}"
hook_name=appliance-nginx-reload

usage() {
    echo "usage: $0 [--server ACME_DIRECTORY_URL] DOMAIN EMAIL" >&2
    exit 2
}

fail() {
    echo "enable-tls: $*" >&2
    exit 1
}

server=""
positional=()
while [ $# -gt 0 ]; do
    case $1 in
        --server) [ $# -ge 2 ] || usage; server=$2; shift 2 ;;
        --server=*) server=${1#--server=}; shift ;;
        -h|--help) usage ;;
        --) shift; positional+=("$@"); break ;;
        -*) echo "enable-tls: unknown option $1" >&2; usage ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -eq 2 ] || usage
domain=${positional[0],,}
email=${positional[1]}

# A public DNS name: dot-separated labels of letters, digits and inner hyphens, ending in an
# alphabetic top-level label. Let's Encrypt refuses anything else, so refuse it here, clearly.
label='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
if [ ${#domain} -gt 253 ] || ! [[ $domain =~ ^($label\.)+[a-z]{2,63}$ ]]; then
    echo "enable-tls: '${positional[0]}' is not a fully qualified domain name (like api.example.com)" >&2
    exit 2
fi
if ! [[ $email =~ ^[A-Za-z0-9._%+-]+@([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$ ]]; then
    echo "enable-tls: '$email' is not an email address (like ops@example.com)" >&2
    exit 2
fi
if [ -n "$server" ] && ! [[ $server =~ ^https://[^[:space:]]+$ ]]; then
    echo "enable-tls: --server must be an https:// ACME directory URL" >&2
    exit 2
fi

[ -f "$site_dir/render-params.json" ] \
    || fail "no rendered site in $site_dir" \
            "(run appliance_ops/render_site.py --out-dir $site_dir first)"

certbot_dirs=()
config_dir=/etc/letsencrypt
if [ -n "${APPLIANCE_CERTBOT_DIR:-}" ]; then
    config_dir=$APPLIANCE_CERTBOT_DIR/config
    certbot_dirs=(--config-dir "$config_dir" --work-dir "$APPLIANCE_CERTBOT_DIR/work"
                  --logs-dir "$APPLIANCE_CERTBOT_DIR/logs")
fi
server_args=()
[ -z "$server" ] || server_args=(--server "$server")

webroot=$(python3 "$render_site" --out-dir "$site_dir" --show webroot)
mkdir -p "$webroot/.well-known/acme-challenge"
chmod 755 "$webroot" "$webroot/.well-known" "$webroot/.well-known/acme-challenge"

# Renewals (certbot's systemd timer or cron job) run every script in this directory after a
# certificate is renewed; testing the configuration first means a bad edit never takes the
# site down on a reload.
hook_dir=$config_dir/renewal-hooks/deploy
mkdir -p "$hook_dir"
# shellcheck disable=SC2016 # $out belongs to the hook, expanded when it runs
{
    echo '#!/bin/bash'
    echo '# Installed by enable-tls.sh: serve the renewed certificate. NGINX notices (stapling'
    echo '# skipped, signal sent) would read as hook errors in certbot logs: print only failures.'
    printf 'out=$(nginx'; printf ' %q' "${nginx_args[@]}" -t -q; echo ' 2>&1) || { echo "$out" >&2; exit 1; }'
    printf 'out=$(nginx'; printf ' %q' "${nginx_args[@]}" -s reload; echo ' 2>&1) || { echo "$out" >&2; exit 1; }'
} >"$hook_dir/.$hook_name.new"
chmod 755 "$hook_dir/.$hook_name.new"
mv -f "$hook_dir/.$hook_name.new" "$hook_dir/$hook_name"

echo "enable-tls: requesting a certificate for $domain"
if ! certbot certonly --webroot -w "$webroot" -d "$domain" --cert-name "$domain" \
        --email "$email" --agree-tos --non-interactive --keep-until-expiring \
        "${server_args[@]}" "${certbot_dirs[@]}"; then
    fail "certbot could not obtain a certificate for $domain; the site keeps its current certificate"
fi

live=$config_dir/live/$domain
if ! [ -s "$live/fullchain.pem" ] || ! [ -s "$live/privkey.pem" ]; then
    fail "certbot left no certificate in $live"
fi

backup=$(mktemp -d)
trap 'rm -rf "$backup"' EXIT
cp -a "$site_dir/." "$backup/"
restore() {
    cp -a "$backup/." "$site_dir/"
    fail "$1; the site keeps its current certificate"
}

python3 "$render_site" --out-dir "$site_dir" --update --server-name "$domain" \
    --cert "$live/fullchain.pem" --key "$live/privkey.pem" >/dev/null \
    || restore "could not render the site for $domain"
nginx "${nginx_args[@]}" -t -q || restore "nginx rejected the configuration for $domain"
nginx "${nginx_args[@]}" -s reload || restore "nginx did not reload"

if [ -z "${APPLIANCE_CERTBOT_DIR:-}" ] && [ -d /run/systemd/system ]; then
    systemctl enable --now certbot.timer >/dev/null
fi
echo "enable-tls: https://$domain now serves the certificate from $live; renewals reload NGINX"
