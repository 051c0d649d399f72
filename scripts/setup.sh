#!/usr/bin/env bash
# Installs what building and testing outbox_pg needs, idempotently: Debian
# packages, cargo-pgrx 0.18.1 and its init for the system PostgreSQL 15, and
# RabbitMQ's STOMP plugin. Quick when everything is already there.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev clang build-essential pkg-config sudo rabbitmq-server socat openssl activemq; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "0.18.1"; then
    echo "setup: installing cargo-pgrx 0.18.1 (a few minutes, once per machine)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "setup: installing cargo-fuzz (for the codec's fuzz target)"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# The broker: RabbitMQ with STOMP on 127.0.0.1:61613.
if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
    echo "setup: starting RabbitMQ"
    $SUDO rabbitmq-server -detached
    $SUDO rabbitmqctl -q wait --timeout 60 "/var/lib/rabbitmq/mnesia/rabbit@$(hostname -s).pid" >/dev/null 2>&1 || true
fi
if ! $SUDO rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_stomp; then
    echo "setup: enabling rabbitmq_stomp"
    $SUDO rabbitmq-plugins enable rabbitmq_stomp >/dev/null
fi
for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/61613) 2>/dev/null && break
    sleep 1
done
(exec 3<>/dev/tcp/127.0.0.1/61613) 2>/dev/null || { echo "setup: RabbitMQ STOMP is not listening on 127.0.0.1:61613" >&2; exit 1; }
