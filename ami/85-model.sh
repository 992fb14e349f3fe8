#!/usr/bin/env bash
# Optionally bakes the model's weights into the image, so an instance starts without fetching
# them. The engine finds them in its cache (APPLIANCE_MODEL_CACHE) by the same name.
set -euo pipefail
model="${PREBAKE_MODEL:-}"
if [ -z "$model" ]; then
    echo "no model to pre-bake; instances fetch APPLIANCE_MODEL at first start"
    exit 0
fi

runuser -u appliance -- env HF_TOKEN="${HF_TOKEN:-}" HF_HOME=/var/cache/appliance/huggingface \
    /usr/local/lib/appliance/venv/bin/python -c \
    'import sys; from pathlib import Path; from server.model import fetch_model; print(fetch_model(sys.argv[1], Path(sys.argv[2])))' \
    "$model" /var/lib/appliance/models
# The image's default model: user data can still name another.
echo "APPLIANCE_MODEL=${model}" > /etc/appliance/image-defaults.env
chmod 0644 /etc/appliance/image-defaults.env
