-- outbox_pg 0.1.0: the SQL surface. CREATE EXTENSION runs this with the
-- extension's schema "outbox" first on the search_path.

-- Roles (cluster-wide: created once, kept by DROP EXTENSION) -----------------
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'outbox_publisher') THEN
        CREATE ROLE outbox_publisher NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'outbox_admin') THEN
        CREATE ROLE outbox_admin NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('outbox_admin', 'outbox_publisher', 'MEMBER') THEN
        GRANT outbox_publisher TO outbox_admin;
    END IF;
END
$roles$;

COMMENT ON ROLE outbox_publisher IS 'outbox_pg: may call outbox.publish() and outbox.send() and create outbox triggers';
COMMENT ON ROLE outbox_admin IS 'outbox_pg: may subscribe, retry failed rows, run retention and read the outbox tables (and publish)';
COMMENT ON SCHEMA outbox IS 'outbox_pg: transactional outbox and idempotent inbox over STOMP';
REVOKE ALL ON SCHEMA outbox FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO outbox_publisher, outbox_admin;

-- The outbox ------------------------------------------------------------------
CREATE TYPE outbox.message_status AS ENUM ('scheduled', 'published', 'failed');
COMMENT ON TYPE outbox.message_status IS
    'Delivery state of an outbox row: scheduled (waiting or retrying), published (the broker confirmed it), failed (gave up after outbox.maximum_retry_attempts)';

CREATE TABLE outbox.published (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid NOT NULL UNIQUE,
    destination     text NOT NULL,
    version         text,
    body            jsonb NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    status          outbox.message_status NOT NULL DEFAULT 'scheduled',
    retry           integer NOT NULL DEFAULT 0,
    added           timestamptz NOT NULL DEFAULT pg_catalog.now(),
    next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    published_at    timestamptz,
    last_error      text
);
-- The publisher's work list: scheduled rows in id order (it filters on
-- next_attempt_at). Partial, so it stays as small as the backlog.
CREATE INDEX published_scheduled ON outbox.published (id) WHERE status = 'scheduled';

COMMENT ON SEQUENCE outbox.published_id_seq IS 'Identity of outbox.published: the order of enqueue';
COMMENT ON TABLE outbox.published IS 'Messages written by outbox.publish(); the publisher worker delivers them to the broker';
COMMENT ON COLUMN outbox.published.id IS 'Order of enqueue; delivery follows it per destination';
COMMENT ON COLUMN outbox.published.message_id IS 'Sent as dop-msg-id; stable across retries';
COMMENT ON COLUMN outbox.published.destination IS 'Wire destination (version suffix applied)';
COMMENT ON COLUMN outbox.published.version IS 'Version given at publish time, if any';
COMMENT ON COLUMN outbox.published.body IS 'Message body, sent as JSON';
COMMENT ON COLUMN outbox.published.headers IS 'User headers plus the generated dop-*, content-type and outbox-* headers';
COMMENT ON COLUMN outbox.published.status IS 'scheduled, published or failed';
COMMENT ON COLUMN outbox.published.retry IS 'Delivery attempts that failed';
COMMENT ON COLUMN outbox.published.added IS 'When the row was written';
COMMENT ON COLUMN outbox.published.next_attempt_at IS 'Earliest time of the next delivery attempt';
COMMENT ON COLUMN outbox.published.published_at IS 'When the broker confirmed receipt';
COMMENT ON COLUMN outbox.published.last_error IS 'Why the last attempt failed';
COMMENT ON INDEX outbox.published_scheduled IS 'Scheduled rows in id order: the publisher''s work list';

REVOKE ALL ON outbox.published FROM PUBLIC;
GRANT SELECT ON outbox.published TO outbox_admin;

-- Publishing -------------------------------------------------------------------
-- Both run as the caller; the row itself is written as the table's owner,
-- by a fully qualified statement that no search_path can redirect.
CREATE FUNCTION outbox.publish(
    destination text,
    body jsonb,
    headers jsonb DEFAULT '{}',
    version text DEFAULT NULL,
    delay interval DEFAULT '0'
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_publish';
COMMENT ON FUNCTION outbox.publish(text, jsonb, jsonb, text, interval) IS
    'Writes a message into the outbox in the current transaction and returns its message id; delivered after commit';

CREATE FUNCTION outbox.publish() RETURNS trigger
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_publish_trigger';
COMMENT ON FUNCTION outbox.publish() IS
    'Row trigger: publishes each changed row; arguments: destination, then fields=a,b version=v serializer=fn headers={...}';

REVOKE ALL ON FUNCTION outbox.publish(text, jsonb, jsonb, text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.publish() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.publish(text, jsonb, jsonb, text, interval) TO outbox_publisher;
GRANT EXECUTE ON FUNCTION outbox.publish() TO outbox_publisher;

CREATE FUNCTION outbox.send(destination text, body jsonb, headers jsonb DEFAULT '{}') RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_send';
COMMENT ON FUNCTION outbox.send(text, jsonb, jsonb) IS
    'Sends a message to the broker at once and waits for its receipt; not transactional (no outbox row)';
REVOKE ALL ON FUNCTION outbox.send(text, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.send(text, jsonb, jsonb) TO outbox_publisher;
