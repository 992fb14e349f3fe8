#!/usr/bin/env bash
# Make the self-signed certificate the appliance serves until a domain is configured, so the
# public port is HTTPS from first boot. Idempotent: an existing pair is kept unless --force.
#
#   make-self-signed.sh [--force] CERT KEY [NAME]
#
# NAME (default: the host name) goes in the subject and, with localhost and 127.0.0.1, in the
# subject alternative names. The key is P-256, readable by root only.
set -euo pipefail

usage() { echo "usage: $0 [--force] CERT KEY [NAME]" >&2; exit 2; }

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
cert=$1
key=$2
name=${3:-$(hostname -f 2>/dev/null || hostname)}
if ! [[ $name =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$ ]]; then
    echo "make-self-signed: '$name' is not a host name" >&2
    exit 2
fi

if [ "$force" -eq 0 ] && [ -s "$cert" ] && [ -s "$key" ] \
    && openssl x509 -in "$cert" -noout -checkend 86400 >/dev/null 2>&1; then
    echo "make-self-signed: keeping $cert"
    exit 0
fi

mkdir -p "$(dirname "$cert")" "$(dirname "$key")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -days 825 -subj "/CN=$name" \
    -addext "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null
chmod 600 "$tmp/key.pem"
chmod 644 "$tmp/cert.pem"
mv -f "$tmp/key.pem" "$key"
mv -f "$tmp/cert.pem" "$cert"
echo "make-self-signed: wrote $cert"
