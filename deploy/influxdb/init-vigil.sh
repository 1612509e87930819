#!/bin/bash
# Runs once, inside the influxdb:2.7 image, right after DOCKER_INFLUXDB_INIT_MODE=setup has created the org,
# the bucket and the admin token (the image runs every executable *.sh in /docker-entrypoint-initdb.d with
# the influx CLI already pointed at the new server, and DOCKER_INFLUXDB_INIT_BUCKET_ID exported).
#
# 1. The DBRP mapping: Vigil reads trends with InfluxQL on /query against VIGIL_INFLUX_DB (contract section
#    1: "for 2.x, its DBRP mapping"), so database VIGIL_INFLUX_DB, retention policy autogen, maps to the
#    bucket. Grafana's InfluxQL datasource reads through the same mapping.
# 2. A read-only v1 user for Grafana (GRAFANA_INFLUX_USER / GRAFANA_INFLUX_PASSWORD): Grafana never holds
#    the admin token.
set -euo pipefail

db="${VIGIL_INFLUX_DB:-vigil}"
bucket_id="${DOCKER_INFLUXDB_INIT_BUCKET_ID:?the influxdb image exports it after setup}"
org="${DOCKER_INFLUXDB_INIT_ORG:?}"

influx v1 dbrp create --org "$org" --bucket-id "$bucket_id" --db "$db" --rp autogen --default
echo "init-vigil: InfluxQL database '$db' (rp autogen) maps to bucket ${DOCKER_INFLUXDB_INIT_BUCKET}" >&2

influx v1 auth create --org "$org" --read-bucket "$bucket_id" \
  --username "${GRAFANA_INFLUX_USER:-grafana}" \
  --password "${GRAFANA_INFLUX_PASSWORD:?set GRAFANA_INFLUX_PASSWORD}" \
  --description "Grafana, read-only on ${DOCKER_INFLUXDB_INIT_BUCKET}" >/dev/null
echo "init-vigil: read-only v1 user '${GRAFANA_INFLUX_USER:-grafana}' for Grafana" >&2
