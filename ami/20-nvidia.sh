#!/usr/bin/env bash
# The NVIDIA driver from Ubuntu's archive, unless the base image already has a working one
# (the Deep Learning Base AMI does). CUDA's user-space libraries come with vLLM's wheels
# (torch's nvidia-* packages), so no CUDA toolkit is installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [ "${FLAVOR:-gpu}" = cpu ]; then
    echo "cpu flavour: no NVIDIA driver"
    exit 0
fi
branch="${NVIDIA_DRIVER_BRANCH:?NVIDIA_DRIVER_BRANCH is required, e.g. 580}"

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA driver present: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
    exit 0
fi

# ubuntu-drivers picks the signed, prebuilt kernel modules for this kernel flavour (aws), which
# follow kernel updates; --gpgpu installs the compute driver without a desktop stack.
apt-get install -y -qq --no-install-recommends ubuntu-drivers-common
ubuntu-drivers install --gpgpu "nvidia:${branch}-server"
apt-get install -y -qq --no-install-recommends "nvidia-utils-${branch}-server"

# Multi-GPU instances with NVSwitch (p4d, p5) need the fabric manager for NVLink.
if lspci -d 10de: 2>/dev/null | grep -qi 'bridge'; then
    apt-get install -y -qq --no-install-recommends "nvidia-fabricmanager-${branch}"
    systemctl enable nvidia-fabricmanager
fi

# Keeps the driver loaded between jobs, so the engine's restarts do not pay for initialisation.
systemctl enable nvidia-persistenced 2>/dev/null || true
echo "NVIDIA driver ${branch} installed; it loads after the reboot"
