-- 0001: typed tables for boxes, their events, telemetry, latest state, commands and dead letters.
--
-- One file for both storage flavours. The migration runner sets `molo.flavour` to 'timescale' or
-- 'postgres' for the transaction; only the two time-series tables differ: TimescaleDB hypertables,
-- or plain PostgreSQL tables partitioned by month on the device timestamp. Queries are the same.

-- Boxes as they announce themselves (birth message) or as provisioned.
CREATE TABLE boxes (
    box_id      text PRIMARY KEY,
    name        text,
    latitude    double precision,
    longitude   double precision,
    households  integer CHECK (households >= 0),
    layout      jsonb,
    firmware    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Latest state per box. Every column is only ever moved forward by newer data (see backend/ingest).
CREATE TABLE box_state (
    box_id              text PRIMARY KEY,
    status_online       boolean NOT NULL DEFAULT false,
    status_session      bigint NOT NULL DEFAULT 0,
    status_ts           timestamptz,           -- device time of the newest status message
    status_changed_at   timestamptz,           -- when the backend saw online/offline change
    status_reason       text,                  -- birth | last_will | graceful
    last_seq            bigint NOT NULL DEFAULT 0,
    last_seen_at        timestamptz,           -- newest device timestamp of any message
    last_received_at    timestamptz,           -- newest time the backend received anything
    telemetry_ts        timestamptz,
    telemetry_seq       bigint,
    power               text,
    battery_pct         real,
    temperature_c       real,
    compartments        jsonb,
    red_boxes           jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE
    timescale boolean := current_setting('molo.flavour') = 'timescale';
    partitioning text := CASE WHEN timescale THEN '' ELSE 'PARTITION BY RANGE (ts)' END;
BEGIN
    -- Every box event. (box_id, seq) names one event; ts is in the key because both hypertables and
    -- partitioned tables need the partitioning column in unique indexes. Ingest refuses a second
    -- row for a (box_id, seq) whatever its ts (see backend/ingest/writer.py).
    EXECUTE format($ddl$
        CREATE TABLE events (
            ts           timestamptz NOT NULL,
            received_at  timestamptz NOT NULL,
            box_id       text NOT NULL,
            seq          bigint NOT NULL,
            session      bigint NOT NULL,
            type         text NOT NULL,
            compartment  smallint,
            parcel_id    text,
            carrier      text,
            size_class   text,
            fraction     text,
            weight_kg    double precision,
            payload      jsonb NOT NULL,
            PRIMARY KEY (box_id, seq, ts)
        ) %s$ddl$, partitioning);
    EXECUTE format($ddl$
        CREATE TABLE telemetry (
            ts             timestamptz NOT NULL,
            received_at    timestamptz NOT NULL,
            box_id         text NOT NULL,
            seq            bigint NOT NULL,
            session        bigint NOT NULL,
            power          text NOT NULL,
            battery_pct    real,
            temperature_c  real NOT NULL,
            occupied       smallint NOT NULL,
            compartments   jsonb NOT NULL,
            red_boxes      jsonb NOT NULL,
            PRIMARY KEY (box_id, seq, ts)
        ) %s$ddl$, partitioning);

    IF timescale THEN
        PERFORM create_hypertable('events', 'ts', chunk_time_interval => INTERVAL '7 days');
        PERFORM create_hypertable('telemetry', 'ts', chunk_time_interval => INTERVAL '1 day');
    ELSE
        CREATE TABLE events_default PARTITION OF events DEFAULT;
        CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
    END IF;
END
$$;

CREATE INDEX events_box_ts ON events (box_id, ts DESC);
CREATE INDEX events_type_ts ON events (type, ts DESC);
CREATE INDEX telemetry_box_ts ON telemetry (box_id, ts DESC);

-- Monthly partitions for the plain-PostgreSQL path. Idempotent and safe to call from several ingest
-- workers at once. The DEFAULT partition only catches rows if a month was not created first, so no
-- row is ever refused for want of a partition. A no-op on TimescaleDB (chunks are automatic).
CREATE FUNCTION molo_ensure_partitions(parent text, from_ts timestamptz, to_ts timestamptz)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    month  timestamptz := date_trunc('month', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name   text;
    made   integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid
                   WHERE c.relname = parent) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('molo_ensure_partitions'));
    WHILE month <= to_ts LOOP
        name := format('%s_p%s', parent, to_char(month AT TIME ZONE 'UTC', 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           name, parent, month, month + INTERVAL '1 month');
            made := made + 1;
        END IF;
        month := month + INTERVAL '1 month';
    END LOOP;
    RETURN made;
END
$fn$;

-- Commands sent to boxes and what became of them.
CREATE TABLE commands (
    command_id    uuid PRIMARY KEY,
    box_id        text NOT NULL,
    action        text NOT NULL,
    compartment   smallint,
    enabled       boolean,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sent', 'succeeded', 'failed', 'rejected', 'timed_out')),
    detail        text,
    requested_by  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    acked_at      timestamptz,
    ack_ts        timestamptz,
    expires_at    timestamptz
);
CREATE INDEX commands_box_created ON commands (box_id, created_at DESC);

-- Everything that failed validation: reason, topic and the raw bytes, so nothing is lost.
CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    topic        text NOT NULL,
    box_id       text,
    error_code   text NOT NULL,
    reason       text NOT NULL,
    payload      bytea NOT NULL,
    worker_id    text
);
CREATE INDEX dead_letters_received ON dead_letters (received_at DESC);
CREATE INDEX dead_letters_box ON dead_letters (box_id, received_at DESC);

-- Per-worker ingest counters, written in the same transaction as the rows they count, so they are
-- exact and survive restarts; the API exposes them as Prometheus metrics.
CREATE TABLE ingest_workers (
    worker_id          text PRIMARY KEY,
    started_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    messages           bigint NOT NULL DEFAULT 0,
    events             bigint NOT NULL DEFAULT 0,
    telemetry          bigint NOT NULL DEFAULT 0,
    statuses           bigint NOT NULL DEFAULT 0,
    command_acks       bigint NOT NULL DEFAULT 0,
    duplicates         bigint NOT NULL DEFAULT 0,
    dead_letters       bigint NOT NULL DEFAULT 0,
    batches            bigint NOT NULL DEFAULT 0,
    batch_seconds_sum  double precision NOT NULL DEFAULT 0,
    last_batch_seconds double precision,
    last_lag_seconds   double precision
);
