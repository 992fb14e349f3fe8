#!/usr/bin/env bash
# Checks the image before it is snapshotted: units load, NGINX's site parses, the GPU is
# visible (gpu flavour) or vLLM is the CPU build (cpu flavour), the commands are installed.
set -euo pipefail
venv=/usr/local/lib/appliance/venv

for unit in /etc/systemd/system/appliance-*.service; do
    findings="$(systemd-analyze verify "$unit" 2>&1)"
    if [ -n "$findings" ]; then
        echo "$findings" >&2
        exit 1
    fi
done
"$venv/bin/python" -c 'import vllm, proxy, server, appliance_ops.idle_stop, appliance_ops.spot_watch; print("vllm", vllm.__version__)'
for cmd in appliance-proxy appliance-engine appliance-keys appliance-models \
    appliance-idle-stop appliance-spot-watch; do
    test -x "$venv/bin/$cmd"
done
for cmd in appliance-firstboot appliance-status appliance-smoke-test appliance-keys \
    appliance-models appliance-enable-tls; do
    test -x "/usr/local/sbin/$cmd"
done
if [ "${FLAVOR:-gpu}" = cpu ]; then
    "$venv/bin/python" -c 'from server.vllm_build import installed_vllm as b; assert b() == "cpu", b()'
else
    nvidia-smi -L
    # The driver must be new enough for the CUDA runtime in vLLM's wheels.
    "$venv/bin/python" -c 'import torch; assert torch.cuda.is_available(), "CUDA unusable"; print(torch.cuda.get_device_name(0))'
fi
nginx -t
