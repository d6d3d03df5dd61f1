-- 0002 (plain PostgreSQL): hourly events per box and type, as a view with the same columns as the
-- TimescaleDB continuous aggregate, so the API's queries are identical on both paths.
CREATE VIEW events_hourly AS
SELECT date_trunc('hour', ts) AS bucket,
       box_id,
       type,
       count(*)::bigint       AS events,
       sum(weight_kg)         AS weight_kg
FROM events
GROUP BY 1, 2, 3;
