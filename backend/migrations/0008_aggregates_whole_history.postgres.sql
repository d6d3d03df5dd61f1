-- 0008 (plain PostgreSQL): nothing to do. events_hourly is a view over events (0002, 0003) and
-- activity_daily a rollup table kept by a trigger in the inserting transaction (0004): both always
-- equal the raw events. Kept so both flavours share one numbered history; the TimescaleDB file
-- brings that flavour to the same guarantee.
SELECT 1;
