#!/bin/sh
# Entrypoint wrapper for eclipse-mosquitto:2 (docker-compose.yml): on first start, create the
# dynamic-security file with the hub's admin account, then hand over to the image's own entrypoint, which
# fixes ownership of /mosquitto and runs Mosquitto as user mosquitto. Vigil's gateway (gateway/mosquitto_sync.py)
# then keeps the devices' clients and ACLs in step with the registry through that account.
set -eu

dynsec=/mosquitto/data/dynamic-security.json
: "${VIGIL_MQTT_ADMIN_USER:?set VIGIL_MQTT_ADMIN_USER (the hub account, the user in VIGIL_MQTT_URL)}"
: "${VIGIL_MQTT_ADMIN_PASSWORD:?set VIGIL_MQTT_ADMIN_PASSWORD (the password in VIGIL_MQTT_URL)}"

if [ ! -s "$dynsec" ]; then
    echo "init-dynsec: creating $dynsec with admin client $VIGIL_MQTT_ADMIN_USER" >&2
    mkdir -p "$(dirname "$dynsec")"
    mosquitto_ctrl dynsec init "$dynsec" "$VIGIL_MQTT_ADMIN_USER" "$VIGIL_MQTT_ADMIN_PASSWORD" >/dev/null
    chmod 0600 "$dynsec"
fi
# The file holds password hashes: readable by Mosquitto only (it also rewrites it on every change).
chown -R mosquitto:mosquitto /mosquitto/data

exec /docker-entrypoint.sh "$@"
