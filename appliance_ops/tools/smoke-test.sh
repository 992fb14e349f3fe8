#!/usr/bin/env bash
# One real request through the front door: NGINX -> gateway -> engine. Checks that a request
# without a key is refused (401), that /v1/models lists the served model, and that a short chat
# completion comes back; prints what it saw and exits non-zero at the first failure.
#
#   smoke-test.sh [--url https://127.0.0.1] [--key-file FILE] [--insecure | --cacert FILE]
#
# The key is read from a file (default /etc/appliance/admin-key, or $APPLIANCE_SMOKE_KEY_FILE)
# and handed to curl through a private header file, so it never appears in a process list.
set -euo pipefail

url=${APPLIANCE_SMOKE_URL:-https://127.0.0.1}
key_file=${APPLIANCE_SMOKE_KEY_FILE:-/etc/appliance/admin-key}
tls=()
# The appliance serves a self-signed certificate until a domain is set up.
insecure_default=1

usage() {
    echo "usage: $0 [--url URL] [--key-file FILE] [--insecure | --cacert FILE]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --url) [ $# -ge 2 ] || usage; url=$2; shift 2 ;;
        --key-file) [ $# -ge 2 ] || usage; key_file=$2; shift 2 ;;
        --insecure) tls=(--insecure); shift ;;
        --cacert) [ $# -ge 2 ] || usage; tls=(--cacert "$2"); insecure_default=0; shift 2 ;;
        -h|--help) usage ;;
        *) usage ;;
    esac
done
if [ ${#tls[@]} -eq 0 ] && [ "$insecure_default" -eq 1 ]; then tls=(--insecure); fi
url=${url%/}

fail() {
    echo "smoke-test: FAIL: $*" >&2
    exit 1
}

[ -r "$key_file" ] || fail "cannot read the key file $key_file (run with sudo?)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
printf 'Authorization: Bearer %s\n' "$(tr -d '[:space:]' <"$key_file")" >"$work/auth"

request() {  # request NAME ARGS... -> prints the HTTP status; body in $work/NAME
    local name=$1
    shift
    curl --silent --show-error "${tls[@]}" --max-time 120 --output "$work/$name" \
        --write-out '%{http_code}' "$@"
}

status=$(request noauth "$url/v1/models") || fail "no answer from $url"
[ "$status" = 401 ] || fail "a request without a key got $status, not 401"
echo "smoke-test: ok: no key -> 401"

status=$(request models -H @"$work/auth" "$url/v1/models")
[ "$status" = 200 ] || fail "GET /v1/models got $status: $(head -c 500 "$work/models")"
model=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"][0]["id"])' \
    "$work/models") || fail "GET /v1/models returned no model"
echo "smoke-test: ok: model $model"

body=$(python3 -c 'import json,sys; print(json.dumps({"model": sys.argv[1], "max_tokens": 8,
    "messages": [{"role": "user", "content": "Say hello."}]}))' "$model")
start=$(date +%s.%N)
status=$(request chat -H @"$work/auth" -H 'Content-Type: application/json' \
    --data "$body" "$url/v1/chat/completions")
end=$(date +%s.%N)
[ "$status" = 200 ] || fail "POST /v1/chat/completions got $status: $(head -c 500 "$work/chat")"
python3 - "$work/chat" "$start" "$end" <<'PY' || fail "the completion was not what an OpenAI client expects"
import json, sys
answer = json.load(open(sys.argv[1]))
choice = answer["choices"][0]
usage = answer["usage"]
assert choice["message"]["role"] == "assistant"
assert usage["completion_tokens"] >= 1
seconds = float(sys.argv[3]) - float(sys.argv[2])
print(f"smoke-test: ok: chat completion, {usage['completion_tokens']} tokens in {seconds:.2f}s,"
      f" finish_reason={choice['finish_reason']}")
PY
echo "smoke-test: PASS"
