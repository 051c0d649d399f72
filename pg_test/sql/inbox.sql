-- outbox.subscribe()/unsubscribe(): the SQL surface and every refusal.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS outbox_pg;

CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN st || ': ' || msg || coalesce(E'\n  hint: ' || nullif(hint, ''), '');
END $$;

SELECT attname, format_type(atttypid, atttypmod) AS type
FROM pg_attribute WHERE attrelid = 'outbox.message'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull
FROM pg_attribute WHERE attrelid = 'outbox.received'::regclass AND attnum > 0 ORDER BY attnum;
SELECT enum_range(NULL::outbox.receipt_status);

CREATE FUNCTION on_msg(m outbox.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION on_msg_bool(m outbox.message) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
CREATE FUNCTION wrong_arg(t text) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION wrong_ret(m outbox.message) RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;

-- the queue defaults to the destination's last segment; the owner is the caller
SELECT outbox.subscribe('orders', '/topic/orders.created', 'on_msg(outbox.message)');
SELECT outbox.subscribe('billing', '/topic/orders', 'on_msg_bool(outbox.message)', 'billing-queue');
SELECT name, destination, callback, queue, owner FROM outbox.subscriptions ORDER BY name;
-- subscribing again changes it
SELECT outbox.subscribe('orders', '/topic/orders.paid', 'on_msg(outbox.message)');
SELECT name, destination, queue FROM outbox.subscriptions WHERE name = 'orders';

-- refusals
SELECT pg_temp.try($$SELECT outbox.subscribe(NULL, '/topic/x', 'on_msg(outbox.message)')$$);
SELECT pg_temp.try($$SELECT outbox.subscribe('bad name', '/topic/x', 'on_msg(outbox.message)')$$);
SELECT pg_temp.try($$SELECT outbox.subscribe('x', 'topic/x', 'on_msg(outbox.message)')$$);
SELECT pg_temp.try($$SELECT outbox.subscribe('x', '/topic/x/', 'on_msg(outbox.message)')$$);
SELECT pg_temp.try($$SELECT outbox.subscribe('x', '/topic/x', 'wrong_arg(text)')$$);
SELECT pg_temp.try($$SELECT outbox.subscribe('x', '/topic/x', 'wrong_ret(outbox.message)')$$);
SELECT pg_temp.try($$SELECT outbox.unsubscribe('nope')$$);

SELECT outbox.unsubscribe('orders');
SELECT outbox.unsubscribe('billing');
SELECT count(*) AS left FROM outbox.subscriptions;

-- every object of the extension carries a comment (but the row and array
-- types PostgreSQL makes along with another object: 18 lists them too)
SELECT pg_describe_object(d.classid, d.objid, 0) AS without_comment
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'outbox_pg')
  AND d.deptype = 'e'
  AND obj_description(d.objid, (SELECT relname FROM pg_class WHERE oid = d.classid)) IS NULL
  AND NOT EXISTS (SELECT 1 FROM pg_depend i
                  WHERE i.classid = d.classid AND i.objid = d.objid AND i.deptype = 'i')
ORDER BY 1;
