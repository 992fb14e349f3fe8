#!/usr/bin/env bash
# Monitoring, each part optional: Prometheus and the blackbox exporter on loopback with the
# appliance's scrape configuration and alerts (PROMETHEUS=true, `-var prometheus=true`), and
# the CloudWatch agent shipping the units' journal, NGINX's access log and the two metrics
# endpoints (CLOUDWATCH=true, `-var cloudwatch=true`). The Grafana dashboard is always copied
# to /usr/local/share/appliance/observability for operators to import.
set -euo pipefail
src="${APPLIANCE_SRC:?APPLIANCE_SRC is required}"
region="${AWS_REGION_NAME:-us-east-1}"
bundle="$src/observability"
export DEBIAN_FRONTEND=noninteractive

install -d -m 0755 /usr/local/share/appliance
rm -rf /usr/local/share/appliance/observability
cp -r "$bundle" /usr/local/share/appliance/observability
chmod -R go-w,a+rX /usr/local/share/appliance/observability

if [ "${PROMETHEUS:-false}" = true ]; then
    apt-get install -y -qq --no-install-recommends prometheus prometheus-blackbox-exporter
    install -m 0644 "$bundle/prometheus/prometheus.yml" /etc/prometheus/prometheus.yml
    install -m 0644 "$bundle/prometheus/appliance-alerts.yml" /etc/prometheus/appliance-alerts.yml
    # The engines to scrape: the single engine until first boot lists a models file's replicas.
    install -m 0644 "$bundle/prometheus/appliance-engines.json" /etc/prometheus/appliance-engines.json
    install -m 0644 "$bundle/prometheus/blackbox.yml" /etc/prometheus/blackbox.yml
    install -m 0644 "$bundle/prometheus/prometheus.default" /etc/default/prometheus
    install -m 0644 "$bundle/prometheus/blackbox.default" /etc/default/prometheus-blackbox-exporter
    promtool check config /etc/prometheus/prometheus.yml
    systemctl enable prometheus.service prometheus-blackbox-exporter.service
fi

if [ "${CLOUDWATCH:-false}" = true ]; then
    agent=/opt/aws/amazon-cloudwatch-agent
    if [ ! -x "$agent/bin/amazon-cloudwatch-agent-ctl" ]; then
        deb=$(mktemp --suffix=.deb)
        # AWS's own package from the build region's bucket; journald needs 1.300070.0 or newer.
        curl --fail --silent --show-error --location --output "$deb" \
            "https://amazoncloudwatch-agent-${region}.s3.${region}.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"
        dpkg -i "$deb"
        rm -f "$deb"
    fi
    install -m 0644 "$bundle/cloudwatch/amazon-cloudwatch-agent.json" \
        "$agent/etc/amazon-cloudwatch-agent.json"
    install -m 0644 "$bundle/cloudwatch/appliance-prometheus.yaml" \
        "$agent/etc/appliance-prometheus.yaml"
    install -m 0644 "$bundle/prometheus/appliance-engines.json" "$agent/etc/appliance-engines.json"
    # Translates and checks the configuration now; the agent starts at boot with the
    # instance's role (the permissions it needs are in the README).
    "$agent/bin/amazon-cloudwatch-agent-ctl" -a fetch-config -m ec2 \
        -c "file:$agent/etc/amazon-cloudwatch-agent.json"
    systemctl enable amazon-cloudwatch-agent.service
fi
