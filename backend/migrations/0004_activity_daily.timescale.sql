-- molo:no-transaction  (continuous aggregates cannot be created inside a transaction)
-- 0004 (TimescaleDB): the events the trip and CO2 method reads, counted per UTC day, box, carrier,
-- type and size class (accounting/activity.py), as a continuous aggregate with real-time
-- aggregation, so a year of KPIs reads a few thousand rows per box instead of every event. Plain
-- aggregates only (count, sum), with the same columns as the plain-PostgreSQL view; the API pivots.
CREATE MATERIALIZED VIEW IF NOT EXISTS activity_daily
WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 day', ts) AS bucket,
       box_id,
       carrier,
       type,
       size_class,
       count(*)::bigint                AS events,
       coalesce(sum(weight_kg), 0)     AS weight_kg
FROM events
WHERE type IN ('parcel.deposited', 'parcel.collected', 'parcel.expired', 'parcel.dropped_off',
               'parcel.picked_up', 'waste.deposited', 'waste.collected')
GROUP BY 1, 2, 3, 4, 5
WITH NO DATA;

-- Buckets not yet materialised are computed from the raw rows: answers equal the plain view's.
ALTER MATERIALIZED VIEW activity_daily SET (timescaledb.materialized_only = false);

SELECT add_continuous_aggregate_policy('activity_daily',
    start_offset => INTERVAL '400 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes', if_not_exists => true);
