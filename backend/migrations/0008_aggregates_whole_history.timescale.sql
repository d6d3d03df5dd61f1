-- molo:no-transaction  (refresh_continuous_aggregate cannot run inside a transaction)
-- 0008 (TimescaleDB 2.18 or newer): the aggregates equal the raw events for every range that still
-- has raw data, old and back-filled history included.
--
-- Before this, the refresh policies materialised only a window (events_hourly the last 30 days,
-- activity_daily the last 400). Real-time aggregation computes from raw rows only the buckets after
-- the watermark, and one policy run moves the watermark to an hour ago: every older bucket the window
-- never reached (history loaded, or back-filled, before the first run) disappeared from the view, and
-- late events older than the window never counted.
--
-- Each statement is idempotent (the file runs outside a transaction): a failed run can be repeated.

-- Transition tables on hypertables (the trigger below) arrived in TimescaleDB 2.18.0.
DO $$
DECLARE
    version text := (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF string_to_array(split_part(version, '-', 1), '.')::int[] < ARRAY[2, 18] THEN
        RAISE EXCEPTION 'TimescaleDB % is too old for MoLo Hubs: 2.18 or newer is needed (triggers with '
                        'transition tables on hypertables). Install a newer release, run ALTER EXTENSION '
                        'timescaledb UPDATE in this database, then molo migrate again', version;
    END IF;
END
$$;

-- activity_daily (the KPIs): the plain path's rollup table (0004) instead of a continuous aggregate,
-- kept by a statement-level trigger in the inserting transaction. Only rows really inserted are in
-- the transition table (a replayed (box, seq) is not), so the counts are exact at once, late events
-- and inserts into compressed chunks included, and the same on both flavours. One statement, so one
-- transaction: ingest waits on the lock (SHARE blocks inserts, not reads) while the stored events
-- are counted, and no event is counted twice or missed between the count and the trigger.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                   WHERE view_schema = current_schema() AND view_name = 'activity_daily') THEN
        RETURN;
    END IF;
    LOCK TABLE events IN SHARE MODE;
    DROP MATERIALIZED VIEW activity_daily;
    CREATE TABLE activity_daily (
        bucket      timestamptz NOT NULL,
        box_id      text NOT NULL,
        carrier     text,
        type        text NOT NULL,
        size_class  text,
        events      bigint NOT NULL,
        weight_kg   double precision NOT NULL
    );
    CREATE UNIQUE INDEX activity_daily_key ON activity_daily (bucket, box_id, carrier, type, size_class)
        NULLS NOT DISTINCT;
    CREATE OR REPLACE FUNCTION molo_count_activity() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        INSERT INTO activity_daily AS a (bucket, box_id, carrier, type, size_class, events, weight_kg)
        SELECT date_trunc('day', ts, 'UTC'), box_id, carrier, type, size_class, count(*), coalesce(sum(weight_kg), 0)
        FROM new_events
        WHERE type IN ('parcel.deposited', 'parcel.collected', 'parcel.expired', 'parcel.dropped_off',
                       'parcel.picked_up', 'waste.deposited', 'waste.collected')
        GROUP BY 1, 2, 3, 4, 5
        ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (bucket, box_id, carrier, type, size_class) DO UPDATE
            SET events = a.events + excluded.events, weight_kg = a.weight_kg + excluded.weight_kg;
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER events_count_activity AFTER INSERT ON events
        REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION molo_count_activity();
    INSERT INTO activity_daily (bucket, box_id, carrier, type, size_class, events, weight_kg)
    SELECT date_trunc('day', ts, 'UTC'), box_id, carrier, type, size_class, count(*), coalesce(sum(weight_kg), 0)
    FROM events
    WHERE type IN ('parcel.deposited', 'parcel.collected', 'parcel.expired', 'parcel.dropped_off',
                   'parcel.picked_up', 'waste.deposited', 'waste.collected')
    GROUP BY 1, 2, 3, 4, 5;
END
$$;

-- events_hourly: its policy refreshes from the beginning of the data (start_offset NULL), the policy
-- TimescaleDB's documentation gives for an aggregate kept up to date with its hypertable. Nothing
-- can fall behind the watermark unmaterialised any more: a run materialises everything changed since
-- the previous one (the ranges in the invalidation log, back-filled history included) up to an hour
-- ago. It recomputes only those ranges, so its cost follows new and late data, not the history's
-- length. Late events for an hour already materialised count from the next run (15 minutes).
-- The old policy goes first, and what its 30-day window left out is materialised before the new one
-- exists: a refresh while the policy's own run refreshes the same window fails ("concurrent refresh").
-- Removing a policy cancels a run of it in progress (SIGINT to its worker); the DO block waits, a
-- minute at most, until no refresh worker of this database is left (the scheduler starts a new
-- policy's first run at once, so on a fresh database 0002's may still be running here).
SELECT remove_continuous_aggregate_policy('events_hourly', if_exists => true);
DO $$
BEGIN
    FOR i IN 1..600 LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
                              AND application_name LIKE 'Refresh Continuous Aggregate Policy%');
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
CALL refresh_continuous_aggregate('events_hourly', NULL, now() - INTERVAL '1 hour');
SELECT add_continuous_aggregate_policy('events_hourly',
    start_offset => NULL, end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes', if_not_exists => true);
