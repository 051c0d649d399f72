-- outbox_pg 0.2.0 -> 0.3.0: capture in the WAL. outbox.stats() (and the
-- view over it) gains the slot's lag and the oldest waiting commit.

DROP VIEW outbox.status;
DROP FUNCTION outbox.stats();

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

REVOKE ALL ON FUNCTION outbox.stats() FROM PUBLIC;
REVOKE ALL ON outbox.status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.stats() TO outbox_admin;
GRANT SELECT ON outbox.status TO outbox_admin;
