-- outbox_pg 0.1.0 -> 0.2.0 (ALTER EXTENSION outbox_pg UPDATE).
-- Subscriptions are written only through subscribe/unsubscribe: outbox_admin
-- loses INSERT, UPDATE and DELETE on outbox.subscriptions, and two private
-- functions of the library write the rows instead of the owner trigger (the
-- caller becomes the owner only if it may execute the callback).
-- subscribe() also refuses a callback that returns a set or is not a plain
-- function; the table checks destination and queue as subscribe() does.
-- Rows, subscriptions and running workers are kept as they are.

\echo Use "ALTER EXTENSION outbox_pg UPDATE TO '0.2.0'" to load this file. \quit

DROP TRIGGER subscription_owner ON outbox.subscriptions;
DROP FUNCTION outbox._subscription_owner();

-- What subscribe() checks, also for a caller of the private functions
-- (the rows there passed subscribe() already).
ALTER TABLE outbox.subscriptions
    ADD CONSTRAINT subscriptions_destination_check CHECK (destination ~ '^/[^[:space:][:cntrl:]]+$'),
    ADD CONSTRAINT subscriptions_queue_check CHECK (queue ~ '^[^[:space:][:cntrl:]/]+$');

COMMENT ON TABLE outbox.subscriptions IS 'One consumer worker per row; written only by outbox.subscribe() and outbox.unsubscribe()';
COMMENT ON COLUMN outbox.subscriptions.owner IS 'Role the callback runs as: whoever subscribed (it must keep EXECUTE on the callback)';

-- Nobody writes outbox.subscriptions directly: these two write it for
-- subscribe/unsubscribe, the caller becoming the owner (the role the
-- callback runs as) only if it may execute the callback.
CREATE FUNCTION outbox._subscription_write(name text, destination text, callback regprocedure, queue text)
RETURNS void LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'outbox_subscription_write';
COMMENT ON FUNCTION outbox._subscription_write(text, text, regprocedure, text) IS
    'Private: writes the calling role''s subscription (see outbox.subscribe)';
CREATE FUNCTION outbox._subscription_delete(name text)
RETURNS boolean LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'outbox_subscription_delete';
COMMENT ON FUNCTION outbox._subscription_delete(text) IS
    'Private: removes a subscription (see outbox.unsubscribe)';

CREATE OR REPLACE FUNCTION outbox.subscribe(name text, destination text, callback regprocedure, queue text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text := coalesce(queue, pg_catalog.regexp_replace(destination, '^.*/', ''));
    ret oid;
    args oidvector;
    retset boolean;
    kind "char";
    max_consumers int := coalesce(pg_catalog.current_setting('outbox.max_consumers', true), '8')::int;
BEGIN
    IF name IS NULL OR destination IS NULL OR callback IS NULL THEN
        RAISE EXCEPTION 'name, destination and callback must not be null' USING ERRCODE = '22004';
    END IF;
    IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid subscription name "%"', name USING ERRCODE = '22023',
            HINT = 'Use 1 to 63 letters, digits, "_", "." or "-".';
    END IF;
    IF destination !~ '^/[^[:space:][:cntrl:]]+$' THEN
        RAISE EXCEPTION 'invalid destination "%"', destination USING ERRCODE = '22023',
            HINT = 'A STOMP destination starts with "/", for example "/topic/orders" or "/queue/billing".';
    END IF;
    IF q = '' OR q !~ '^[^[:space:][:cntrl:]/]+$' THEN
        RAISE EXCEPTION 'invalid queue name "%"', q USING ERRCODE = '22023',
            HINT = 'Pass a queue name without "/" or spaces, or a destination whose last segment is one.';
    END IF;
    SELECT p.prorettype, p.proargtypes, p.proretset, p.prokind INTO ret, args, retset, kind
    FROM pg_catalog.pg_proc p WHERE p.oid = callback;
    IF pg_catalog.array_length(args::oid[], 1) IS DISTINCT FROM 1 OR retset OR kind <> 'f'
       OR args[0] <> 'outbox.message'::pg_catalog.regtype
       OR ret NOT IN ('void'::pg_catalog.regtype, 'boolean'::pg_catalog.regtype) THEN
        RAISE EXCEPTION 'callback % must take (outbox.message) and return void or boolean', callback
            USING ERRCODE = '42P13',
            HINT = 'Declare it as CREATE FUNCTION f(m outbox.message) RETURNS void (or boolean: false discards the message).';
    END IF;
    IF NOT pg_catalog.has_function_privilege(callback, 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for callback %', callback USING ERRCODE = '42501',
            HINT = 'The callback runs as the role that subscribes, which needs EXECUTE on it.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM outbox.subscriptions s WHERE s.name = subscribe.name)
       AND (SELECT pg_catalog.count(*) FROM outbox.subscriptions) >= max_consumers THEN
        RAISE EXCEPTION 'too many subscriptions: outbox.max_consumers is %', max_consumers
            USING ERRCODE = '53400', HINT = 'Raise outbox.max_consumers (and max_worker_processes) and restart, or unsubscribe one.';
    END IF;
    PERFORM outbox._subscription_write(subscribe.name, subscribe.destination, subscribe.callback, q);
END
$$;

CREATE OR REPLACE FUNCTION outbox.unsubscribe(name text) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT outbox._subscription_delete(unsubscribe.name) THEN
        RAISE EXCEPTION 'subscription "%" does not exist', name USING ERRCODE = '42704',
            HINT = 'The subscriptions are listed in outbox.subscriptions.';
    END IF;
END
$$;

REVOKE INSERT, UPDATE, DELETE ON outbox.subscriptions FROM outbox_admin;
REVOKE ALL ON FUNCTION outbox._subscription_write(text, text, regprocedure, text),
    outbox._subscription_delete(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox._subscription_write(text, text, regprocedure, text),
    outbox._subscription_delete(text) TO outbox_admin;
