-- 0003 (plain PostgreSQL): bucket events_hourly in UTC whatever the session's TimeZone, like
-- TimescaleDB's time_bucket does (0002 used date_trunc('hour', ts), which follows the session zone:
-- different buckets for zones such as +05:30).
CREATE OR REPLACE VIEW events_hourly AS
SELECT date_trunc('hour', ts, 'UTC') AS bucket,
       box_id,
       type,
       count(*)::bigint       AS events,
       sum(weight_kg)         AS weight_kg
FROM events
GROUP BY 1, 2, 3;
