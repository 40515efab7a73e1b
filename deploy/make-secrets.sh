#!/bin/sh
# Creates deploy/secrets/: one random password per NATS user and ClickHouse user (files,
# mode 0600), and nats.env, the server's view of them (AUTOSERVE_<USER>_PASSWORD=...).
# For a NATS cluster, also the route credential (route.password) and nats-cluster.env:
# AUTOSERVE_ROUTE_PASSWORD and AUTOSERVE_NATS_ROUTES, every node's route URL with it, for
# nats-cluster.conf. The nodes are NATS_ROUTES_TO (host:port, space-separated; default the
# compose file's "nats-1:6222 nats-2:6222 nats-3:6222"; deploy/README.md has the Helm ones).
# Idempotent: an existing password is kept. Never commit deploy/secrets/.
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
: > "$dir/nats.env.tmp"
for user in prober detector breaker recovery reporter alerter admin operator client route clickhouse-reporter clickhouse-reader clickhouse-migrator; do
  file="$dir/$user.password"
  [ -s "$file" ] || head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$file"
  case "$user" in
    clickhouse-*|route) ;;
    *) printf 'AUTOSERVE_%s_PASSWORD=%s\n' "$(echo "$user" | tr a-z A-Z)" "$(cat "$file")" >> "$dir/nats.env.tmp" ;;
  esac
done
mv "$dir/nats.env.tmp" "$dir/nats.env"
route="$(cat "$dir/route.password")"
routes=""
for node in ${NATS_ROUTES_TO:-nats-1:6222 nats-2:6222 nats-3:6222}; do
  routes="${routes:+$routes,}nats://route:$route@$node"
done
printf 'AUTOSERVE_ROUTE_PASSWORD=%s\nAUTOSERVE_NATS_ROUTES=[%s]\n' "$route" "$routes" > "$dir/nats-cluster.env"
# ClickHouse URLs carry their passwords (logged redacted): the reporter writes as `reporter`
# (INSERT only) and reads its reports as `reader` (SELECT only); `autoserve migrate` creates
# the tables as `migrator`. See clickhouse-users.sql.
ch() { printf 'http://%s:%s@clickhouse:8123/autoserve' "$1" "$(cat "$dir/clickhouse-$1.password")"; }
{
  printf 'AUTOSERVE_CLICKHOUSE_URL=%s\n' "$(ch reporter)"
  printf 'AUTOSERVE_CLICKHOUSE_READ_URL=%s\n' "$(ch reader)"
  printf 'AUTOSERVE_REPORTER_MIGRATE=false\n'
} > "$dir/reporter-clickhouse.env"
printf 'AUTOSERVE_CLICKHOUSE_URL=%s\n' "$(ch migrator)" > "$dir/migrator-clickhouse.env"
echo "secrets in $dir"
