-- The inbox: subscriptions, the consumed-message record, and the message
-- type handed to callbacks. Consumer workers (one per subscription) are
-- started by the publisher worker acting as supervisor.

CREATE TYPE outbox.receipt_status AS ENUM ('consumed', 'failed', 'discarded');
COMMENT ON TYPE outbox.receipt_status IS
    'State of a received message: consumed (the callback succeeded), failed (it raised; tried again on redelivery), discarded (it returned false)';

CREATE TYPE outbox.message AS (
    message_id  text,
    destination text,
    headers     jsonb,
    body        jsonb,
    redelivered boolean
);
COMMENT ON TYPE outbox.message IS 'What a subscription callback receives: callback(message outbox.message) RETURNS void or boolean';

CREATE TABLE outbox.received (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text NOT NULL UNIQUE,
    subscription text NOT NULL,
    destination  text,
    headers      jsonb,
    body         jsonb,
    status       outbox.receipt_status NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    last_error   text,
    added        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    processed_at timestamptz
);
COMMENT ON SEQUENCE outbox.received_id_seq IS 'Identity of outbox.received';
COMMENT ON TABLE outbox.received IS 'Messages consumed by subscriptions, one row per message id: the idempotent inbox';
COMMENT ON COLUMN outbox.received.message_id IS 'cap-msg-id, else dop-msg-id, else amqp-message-id, else the broker''s message-id';
COMMENT ON COLUMN outbox.received.subscription IS 'Subscription that received it';
COMMENT ON COLUMN outbox.received.status IS 'consumed, failed or discarded';
COMMENT ON COLUMN outbox.received.attempts IS 'Times the callback was called for it';
COMMENT ON COLUMN outbox.received.last_error IS 'Why the last attempt failed';
COMMENT ON COLUMN outbox.received.processed_at IS 'When the last attempt ended';
COMMENT ON COLUMN outbox.received.id IS 'Order of arrival';
COMMENT ON COLUMN outbox.received.destination IS 'Destination the message came from';
COMMENT ON COLUMN outbox.received.headers IS 'The MESSAGE frame''s headers';
COMMENT ON COLUMN outbox.received.body IS 'The message body (NULL when it was not JSON)';
COMMENT ON COLUMN outbox.received.added IS 'When the message first arrived';

CREATE TABLE outbox.subscriptions (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    destination text NOT NULL CHECK (destination ~ '^/[^[:space:][:cntrl:]]+$'),
    callback    regprocedure NOT NULL,
    queue       text NOT NULL CHECK (queue ~ '^[^[:space:][:cntrl:]/]+$'),
    owner       regrole NOT NULL,
    created     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE outbox.subscriptions IS 'One consumer worker per row; written only by outbox.subscribe() and outbox.unsubscribe()';
COMMENT ON COLUMN outbox.subscriptions.name IS 'Subscription name; the consumer worker''s application_name';
COMMENT ON COLUMN outbox.subscriptions.destination IS 'STOMP destination subscribed to';
COMMENT ON COLUMN outbox.subscriptions.callback IS 'callback(outbox.message) returning void or boolean (false discards)';
COMMENT ON COLUMN outbox.subscriptions.queue IS 'x-queue-name; dead letters go to DLQ.<queue>';
COMMENT ON COLUMN outbox.subscriptions.owner IS 'Role the callback runs as: whoever subscribed (it must keep EXECUTE on the callback)';
COMMENT ON COLUMN outbox.subscriptions.created IS 'When the subscription was made';

CREATE FUNCTION outbox._wake() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'outbox_wake';
COMMENT ON FUNCTION outbox._wake() IS 'Private: wakes the workers when the current transaction commits';

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

CREATE FUNCTION outbox.subscribe(name text, destination text, callback regprocedure, queue text DEFAULT NULL)
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
COMMENT ON FUNCTION outbox.subscribe(text, text, regprocedure, text) IS
    'Registers (or changes) a subscription; its consumer worker starts within a second of commit and calls callback once per message id';

CREATE FUNCTION outbox.unsubscribe(name text) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT outbox._subscription_delete(unsubscribe.name) THEN
        RAISE EXCEPTION 'subscription "%" does not exist', name USING ERRCODE = '42704',
            HINT = 'The subscriptions are listed in outbox.subscriptions.';
    END IF;
END
$$;
COMMENT ON FUNCTION outbox.unsubscribe(text) IS
    'Removes a subscription; its worker stops within a second of commit (the queue and its messages stay)';

REVOKE ALL ON outbox.received, outbox.subscriptions FROM PUBLIC;
GRANT SELECT ON outbox.received TO outbox_admin;
GRANT SELECT ON outbox.subscriptions TO outbox_admin;
REVOKE ALL ON FUNCTION outbox.subscribe(text, text, regprocedure, text), outbox.unsubscribe(text),
    outbox._wake(), outbox._subscription_write(text, text, regprocedure, text),
    outbox._subscription_delete(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.subscribe(text, text, regprocedure, text), outbox.unsubscribe(text), outbox._wake(),
    outbox._subscription_write(text, text, regprocedure, text), outbox._subscription_delete(text)
    TO outbox_admin;
