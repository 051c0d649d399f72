-- Operating outbox_pg: worker status, retrying failed rows, retention.

-- Failed rows are few; this keeps counting and retrying them cheap.
CREATE INDEX published_failed ON outbox.published (id) WHERE status = 'failed';
COMMENT ON INDEX outbox.published_failed IS 'Failed rows: for outbox.stats() and outbox.retry_failed()';

CREATE FUNCTION outbox._workers() RETURNS jsonb
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'outbox_workers';
COMMENT ON FUNCTION outbox._workers() IS 'Private: the workers'' status from shared memory, as a JSON array';

CREATE FUNCTION outbox.stats(
    OUT worker text, OUT name text, OUT pid integer, OUT state text, OUT host text,
    OUT messages bigint, OUT started_at timestamptz, OUT last_error text, OUT last_error_at timestamptz,
    OUT scheduled bigint, OUT failed bigint, OUT oldest_scheduled_age interval,
    OUT slot_lag_bytes bigint, OUT oldest_waiting_commit timestamptz)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
    WITH workers AS (
        SELECT w FROM jsonb_array_elements(outbox._workers()) w
    ), backlog AS (
        SELECT (SELECT count(*) FROM outbox.published WHERE status = 'scheduled') AS scheduled,
               (SELECT count(*) FROM outbox.published WHERE status = 'failed') AS failed,
               (SELECT now() - added FROM outbox.published WHERE status = 'scheduled' ORDER BY id LIMIT 1) AS oldest,
               (SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
                        - restart_lsn)::bigint FROM pg_replication_slots
                 WHERE slot_name = 'outbox_pg_' || (SELECT oid FROM pg_database WHERE datname = current_database())) AS lag,
               (SELECT to_timestamp((w->>'oldest_waiting_commit')::float8) FROM workers
                 WHERE w->>'worker' = 'publisher') AS waiting
    )
    SELECT w->>'worker', w->>'name', (w->>'pid')::int, w->>'state', w->>'host',
           (w->>'messages')::bigint, to_timestamp((w->>'started_at')::float8), w->>'last_error',
           to_timestamp((w->>'last_error_at')::float8),
           b.scheduled, b.failed, b.oldest, b.lag, b.waiting
    FROM backlog b LEFT JOIN workers ON true
$$;
COMMENT ON FUNCTION outbox.stats() IS
    'One row per worker (publisher, each consumer): state, broker host, messages since start, last error; with the outbox backlog (scheduled and failed rows, age of the oldest scheduled one) and, with outbox.capture = ''wal'', the slot''s lag in bytes and the commit time of the oldest captured message not yet confirmed';

CREATE VIEW outbox.status AS SELECT * FROM outbox.stats();
COMMENT ON VIEW outbox.status IS 'outbox.stats() as a view: cheap enough to scrape every few seconds';

CREATE FUNCTION outbox.retry_failed(ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE n bigint;
BEGIN
    UPDATE outbox.published
       SET status = 'scheduled', retry = 0, next_attempt_at = now()
     WHERE status = 'failed' AND (ids IS NULL OR id = ANY (ids));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM outbox._wake();
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION outbox.retry_failed(bigint[]) IS
    'Reschedules failed outbox rows (all of them when ids is NULL): status scheduled, retry 0, due now; returns how many';

-- One bounded batch of retention; the worker calls it in its own
-- transactions, so no lock on a big table is held for long.
CREATE FUNCTION outbox._cleanup_batch(batch integer DEFAULT 5000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cutoff timestamptz := now() - make_interval(days => coalesce(current_setting('outbox.days_to_keep_data', true), '30')::int);
    a bigint;
    b bigint;
BEGIN
    DELETE FROM outbox.published WHERE id IN (
        SELECT id FROM outbox.published
         WHERE status IN ('published', 'failed') AND added < cutoff
         ORDER BY id LIMIT batch);
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM outbox.received WHERE id IN (
        SELECT id FROM outbox.received WHERE added < cutoff ORDER BY id LIMIT batch);
    GET DIAGNOSTICS b = ROW_COUNT;
    RETURN a + b;
END
$$;
COMMENT ON FUNCTION outbox._cleanup_batch(integer) IS 'Private: deletes one batch of rows older than outbox.days_to_keep_data';

CREATE FUNCTION outbox.cleanup() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE total bigint := 0; n bigint;
BEGIN
    LOOP
        n := outbox._cleanup_batch(5000);
        total := total + n;
        EXIT WHEN n = 0;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION outbox.cleanup() IS
    'Runs retention now: deletes published and failed outbox rows and inbox rows older than outbox.days_to_keep_data (scheduled rows never); returns how many';

REVOKE ALL ON FUNCTION outbox._workers(), outbox.stats(), outbox.retry_failed(bigint[]),
    outbox._cleanup_batch(integer), outbox.cleanup() FROM PUBLIC;
REVOKE ALL ON outbox.status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.stats(), outbox.retry_failed(bigint[]), outbox.cleanup() TO outbox_admin;
GRANT SELECT ON outbox.status TO outbox_admin;
