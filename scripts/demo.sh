#!/usr/bin/env bash
# The outbox_pg demo: installs the extension into the local PostgreSQL 15,
# starts a throw-away cluster with outbox_pg preloaded (port 54330, data in
# /tmp/outbox_pg-demo), makes sure RabbitMQ's STOMP plugin is on, creates a
# table with an outbox trigger, writes rows, and shows the outbox rows and
# the messages a STOMP subscriber received. Stops the cluster at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
PORT=${OUTBOX_DEMO_PORT:-54330}
DIR=/tmp/outbox_pg-demo
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

bash scripts/setup.sh
echo "== building and installing outbox_pg into $("$PG_CONFIG" --pkglibdir)"
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
cargo build -q -p outbox_pg_e2e --bin stomp_tail

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ -d "$DIR/data" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
[ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
as_pg "$BIN/initdb" -A trust -U postgres -D "$DIR/data" --no-sync >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'outbox_pg'
outbox.database = 'postgres'
outbox.stomp_hosts = '127.0.0.1:61613'
CONF
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
trap 'as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null' EXIT
echo "== throw-away cluster on 127.0.0.1:$PORT (log: $DIR/server.log)"

# A subscriber first: topics keep nothing for absent subscribers.
target/debug/stomp_tail /topic/demo.orders 4 > "$DIR/received.txt" &
tail_pid=$!
for _ in $(seq 1 100); do grep -q subscribed "$DIR/received.txt" 2>/dev/null && break; sleep 0.1; done

psql() { "$BIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
psql -e <<'SQL'
CREATE EXTENSION outbox_pg;
-- The inbox: a SQL callback called once per message id.
CREATE TABLE shipments (order_id int, status text, message_id text);
CREATE FUNCTION ship(m outbox.message) RETURNS void LANGUAGE sql AS $$
    INSERT INTO shipments VALUES ((m.body->>'id')::int, m.body->>'status', m.message_id) $$;
SELECT outbox.subscribe('shipping', '/topic/demo.orders', 'ship(outbox.message)');
SQL
# The consumer worker subscribes within a second.
for _ in $(seq 1 50); do grep -q 'consumer "shipping": subscribed' "$DIR/server.log" && break; sleep 0.2; done
psql -e <<'SQL'
CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL, total numeric(10,2));
CREATE TRIGGER orders_outbox AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/demo.orders', 'fields=status,total');
BEGIN;
INSERT INTO orders (status, total) VALUES ('new', 9.90), ('new', 25.00);
UPDATE orders SET status = 'paid' WHERE id = 1;
SELECT outbox.publish('/topic/demo.orders', '{"note": "published from SQL"}', '{"team": "billing"}');
COMMIT;
SQL
sleep 0.5
echo "== the outbox after commit"
psql -c "SELECT id, destination, body, status, published_at IS NOT NULL AS confirmed FROM outbox.published ORDER BY id"
wait "$tail_pid"
echo "== what a plain STOMP subscriber received"
cat "$DIR/received.txt"
echo "== what the inbox's callback did (subscription 'shipping')"
psql -c "SELECT * FROM shipments" \
     -c "SELECT message_id, subscription, status, attempts FROM outbox.received ORDER BY id" \
     -c "SELECT worker, name, state, host, messages FROM outbox.status"
psql -c "SELECT outbox.unsubscribe('shipping')" >/dev/null
