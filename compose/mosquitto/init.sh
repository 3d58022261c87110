#!/bin/sh
# Writes Mosquitto's password file from the compose secrets (mounted under /run/secrets), one user per
# role, plus one per device from mqtt_device_passwords ("device-01:secret,device-02:secret", may be
# empty). Run by the one-shot mosquitto-init service before the broker starts.
set -eu
out=/mosquitto/auth/passwd
tmp="$out.tmp"
: > "$tmp"
chmod 0600 "$tmp"
add() {  # user, password
    if [ -z "$2" ]; then
        echo "mosquitto-init: no password for MQTT user $1: set it in .env" >&2
        exit 1
    fi
    mosquitto_passwd -b "$tmp" "$1" "$2"
}
add ingester "$(cat /run/secrets/mqtt_ingester_password)"
add simulator "$(cat /run/secrets/mqtt_simulator_password)"
add alerts "$(cat /run/secrets/mqtt_alerts_password)"
devices="$(cat /run/secrets/mqtt_device_passwords 2>/dev/null || true)"
for pair in $(echo "$devices" | tr ',' ' '); do
    add "${pair%%:*}" "${pair#*:}"
done
chown mosquitto:mosquitto "$tmp" 2>/dev/null || true
mv "$tmp" "$out"
echo "mosquitto-init: $(wc -l < "$out") MQTT users written"
