-- molo:no-transaction  (continuous aggregates cannot be created inside a transaction)
-- 0002 (TimescaleDB): hourly events per box and type as a continuous aggregate, refreshed by a
-- policy, plus compression and retention policies for the hypertables.
-- Run outside a transaction, so every statement is idempotent: if one fails part-way (say, a
-- server whose licence lacks compression), fixing the cause and re-running `molo migrate` works.
CREATE MATERIALIZED VIEW IF NOT EXISTS events_hourly
WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket,
       box_id,
       type,
       count(*)::bigint       AS events,
       sum(weight_kg)         AS weight_kg
FROM events
GROUP BY 1, 2, 3
WITH NO DATA;

-- Real-time aggregation: buckets not yet materialised are computed from the raw rows, so the view
-- answers exactly like the plain-PostgreSQL one.
ALTER MATERIALIZED VIEW events_hourly SET (timescaledb.materialized_only = false);

SELECT add_continuous_aggregate_policy('events_hourly',
    start_offset => INTERVAL '30 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes', if_not_exists => true);

ALTER TABLE events SET (timescaledb.compress, timescaledb.compress_segmentby = 'box_id',
                       timescaledb.compress_orderby = 'ts DESC, seq DESC');
SELECT add_compression_policy('events', INTERVAL '30 days', if_not_exists => true);

ALTER TABLE telemetry SET (timescaledb.compress, timescaledb.compress_segmentby = 'box_id',
                          timescaledb.compress_orderby = 'ts DESC, seq DESC');
SELECT add_compression_policy('telemetry', INTERVAL '7 days', if_not_exists => true);
-- Telemetry is for operations, events are the record (KPIs are computed from them): only telemetry
-- expires by default. Change or add policies per deployment.
SELECT add_retention_policy('telemetry', INTERVAL '400 days', if_not_exists => true);
