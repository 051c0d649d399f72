-- The trigger function outbox.publish(): bodies, options, and every wrong use.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS outbox_pg;
DELETE FROM outbox.published;

CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN st || ': ' || msg || coalesce(E'\n  hint: ' || nullif(hint, ''), '');
END $$;

CREATE TABLE orders (id bigint PRIMARY KEY, status text, total numeric(10,2), placed timestamptz);
CREATE FUNCTION order_json(o orders) RETURNS jsonb LANGUAGE sql AS
    $$ SELECT jsonb_build_object('order', o.id, 'state', upper(o.status)) $$;
CREATE FUNCTION order_text(o orders) RETURNS text LANGUAGE sql AS $$ SELECT o.status $$;
CREATE FUNCTION order_null(o orders) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;

-- whole row, every operation
CREATE TRIGGER o_all AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/orders');
INSERT INTO orders VALUES (1, 'new', 10.5, '2026-01-02 03:04:05+00');
UPDATE orders SET status = 'paid';
DELETE FROM orders;
SELECT destination, body, headers->>'outbox-op' AS op, headers->>'outbox-table' AS tbl FROM outbox.published ORDER BY id;
DROP TRIGGER o_all ON orders;
DELETE FROM outbox.published;

-- fields (id always included), version, headers, serializer (wins over fields)
CREATE TRIGGER o_fields AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/orders', 'fields=status, total', 'version=v3',
                                                 'headers={"team": "billing"}');
CREATE TRIGGER o_ser AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/orders', 'serializer=order_json', 'fields=total');
INSERT INTO orders VALUES (2, 'new', 3, now());
SELECT destination, version, body, headers->>'team' AS team FROM outbox.published ORDER BY id;

-- a column change is seen by the cached projection
ALTER TABLE orders DROP COLUMN total;
SELECT pg_temp.try($$INSERT INTO orders VALUES (3, 'new', now())$$);
ALTER TABLE orders ADD COLUMN total int;
INSERT INTO orders VALUES (4, 'new', now(), 7);
SELECT body FROM outbox.published WHERE destination = '/topic/orders.v3' ORDER BY id;
DROP TRIGGER o_fields ON orders;
DROP TRIGGER o_ser ON orders;
DELETE FROM outbox.published;
DELETE FROM orders;

-- every wrong trigger: SQLSTATE, message naming the trigger, hint; nothing written
CREATE FUNCTION pg_temp.bad_trigger(timing text, level text, args text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
    EXECUTE format('CREATE TRIGGER bad %s ON orders FOR EACH %s EXECUTE FUNCTION outbox.publish(%s)', timing, level, args);
    r := pg_temp.try($q$INSERT INTO orders VALUES (10, 'x', now(), 1)$q$);
    DROP TRIGGER bad ON orders;
    RETURN r;
END $$;
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', '');
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'orders'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$''$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'colour=red'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'fields'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'fields='$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'fields=status,nope'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'version=v1', 'version=v2'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'version='$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'serializer=no_such_function'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'serializer=order_text'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'serializer=order_null'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'headers={"a": 1}'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'headers={"receipt": "r"}'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'headers=[]'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'ROW', $$'/topic/o', 'headers={nope'$$);
SELECT pg_temp.bad_trigger('AFTER INSERT', 'STATEMENT', $$'/topic/o'$$);
SELECT pg_temp.bad_trigger('BEFORE INSERT', 'ROW', $$'/topic/o'$$);
SELECT (SELECT count(*) FROM orders) AS orders, (SELECT count(*) FROM outbox.published) AS written;

-- called directly, not as a trigger
SELECT pg_temp.try($$SELECT outbox.publish()$$);

-- privileges: PUBLIC may not call the API
SELECT has_function_privilege('public', 'outbox.publish(text, jsonb, jsonb, text, interval)', 'EXECUTE') AS public_publish,
       has_function_privilege('outbox_publisher', 'outbox.publish(text, jsonb, jsonb, text, interval)', 'EXECUTE') AS publisher_publish,
       has_function_privilege('outbox_publisher', 'outbox.publish()', 'EXECUTE') AS publisher_trigger,
       has_table_privilege('public', 'outbox.published', 'SELECT') AS public_reads,
       pg_has_role('outbox_admin', 'outbox_publisher', 'MEMBER') AS admin_publishes;
