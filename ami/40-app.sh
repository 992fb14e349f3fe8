#!/usr/bin/env bash
# This project and vLLM in a virtualenv at a fixed path, from a hash-pinned lock, and the
# operator's commands on PATH.
set -euo pipefail
src="${APPLIANCE_SRC:?APPLIANCE_SRC is required}"
version="${VLLM_VERSION:?VLLM_VERSION is required}"
prefix=/usr/local/lib/appliance
venv="$prefix/venv"
lock="$src/ami/requirements-vllm.lock"

if ! grep -q "^vllm==${version} " "$lock"; then
    echo "ami/requirements-vllm.lock does not pin vllm==${version}; regenerate it" \
        "(scripts/lock-vllm.sh ${version}) or build with -var vllm_version=<the pinned one>" >&2
    exit 1
fi

install -d -m 0755 "$prefix"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet --require-hashes --no-deps -r "$lock"
# The project itself: its dependencies, and setuptools to build it, are pinned in the lock.
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation "$src"
"$venv/bin/pip" check

# NGINX templates and the scripts that render them keep the repository's layout, since
# render_site.py and enable-tls.sh find each other (and nginx/) by relative paths.
for dir in nginx scripts; do
    rm -rf "${prefix:?}/$dir"
    cp -r "$src/$dir" "$prefix/$dir"
done
chmod -R go-w "$prefix"

install -m 0755 "$src/scripts/appliance_firstboot.py" /usr/local/sbin/appliance-firstboot
install -m 0755 "$src/scripts/appliance-status" /usr/local/sbin/appliance-status
install -m 0755 "$src/scripts/smoke-test.sh" /usr/local/sbin/appliance-smoke-test
install -m 0755 "$src/ami/files/appliance-keys" /usr/local/sbin/appliance-keys
install -m 0755 "$src/ami/files/appliance-enable-tls" /usr/local/sbin/appliance-enable-tls
