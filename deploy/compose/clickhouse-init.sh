#!/bin/sh
# Run by the clickhouse-server image on first start (/docker-entrypoint-initdb.d).
set -eu
clickhouse-client --multiquery \
  --param_reporter_password="$(cat /run/secrets/clickhouse_reporter_password)" \
  --param_reader_password="$(cat /run/secrets/clickhouse_reader_password)" \
  --param_migrator_password="$(cat /run/secrets/clickhouse_migrator_password)" \
  < /etc/autoserve/clickhouse-users.sql
