-- outbox.publish(): what it writes, and every input it refuses.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS outbox_pg;

-- Runs a statement; shows SQLSTATE, message and hint if it fails.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN st || ': ' || msg || coalesce(E'\n  hint: ' || nullif(hint, ''), '');
END $$;

-- the table and its contract columns
SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull
FROM pg_attribute WHERE attrelid = 'outbox.published'::regclass AND attnum > 0 ORDER BY attnum;
SELECT enum_range(NULL::outbox.message_status);
SELECT indexdef FROM pg_indexes WHERE schemaname = 'outbox' AND tablename = 'published' ORDER BY indexname;

-- a publish writes one scheduled row whose id comes back
SELECT outbox.publish('/topic/orders', '{"n": 1}', '{"team": "billing", "dop-correlation-id": "c-1"}') AS id \gset
SELECT message_id = :'id' AS same_id FROM outbox.published;
SELECT destination, version, body, status, retry, published_at, last_error,
       headers - 'dop-msg-id' - 'dop-msg-sent-time' AS headers,
       headers->>'dop-msg-id' = message_id::text AS dop_id_is_message_id,
       headers->>'dop-msg-sent-time' ~ '^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00:00$' AS sent_time_format
FROM outbox.published;

-- version suffix, delay, generated headers win over the user's
SELECT outbox.publish('/queue/billing', '[1, 2]', '{"dop-msg-type": "Forged", "content-type": "text/plain"}',
                      version => 'v2', delay => '10 minutes') IS NOT NULL AS published;
SELECT destination, version, body, headers->>'dop-msg-type' AS type, headers->>'content-type' AS content_type,
       headers->>'dop-msg-destination' AS dop_destination,
       next_attempt_at - added AS delay, length(headers->>'dop-correlation-id') AS corr_len
FROM outbox.published WHERE destination LIKE '/queue/billing%';

-- every bad input: SQLSTATE, message, hint; nothing written
DELETE FROM outbox.published;
SELECT pg_temp.try($$SELECT outbox.publish(NULL, '{}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('', '{}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('topic/orders', '{}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/', '{}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/a b', '{}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', NULL)$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '"text"')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '[]')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"n": 1}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"n": null}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"n": {"a": "b"}}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"": "x"}')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"a:b": "x"}')$$);
SELECT pg_temp.try(format($$SELECT outbox.publish('/topic/x', '{}', '{"%s": "x"}')$$, h))
FROM unnest(ARRAY['destination', 'content-length', 'receipt', 'transaction', 'message-id',
                  'subscription', 'ack', 'id', 'Destination']) AS h;
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', '{"x": 1')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', version => '')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', '{}', delay => '-1 second')$$);
SELECT pg_temp.try($$SELECT outbox.publish('/topic/x', to_jsonb(repeat('x', 2 * 1024 * 1024)))$$);
SELECT count(*) AS written FROM outbox.published;

-- header values are stored as given: escaping happens on the wire
SELECT outbox.publish('/topic/x', '{}', '{"note": "line1\nline2:colon"}') IS NOT NULL AS published;
SELECT headers->>'note' AS note FROM outbox.published;

-- NULL headers mean none; NULL delay means now
DELETE FROM outbox.published;
SELECT outbox.publish('/topic/x', '{}', NULL, NULL, NULL) IS NOT NULL AS published;
SELECT headers ? 'dop-msg-id' AS has_generated, next_attempt_at = added AS due_now FROM outbox.published;
