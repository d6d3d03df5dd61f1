-- 0003 (TimescaleDB): nothing to do; time_bucket already buckets in UTC. Kept so both flavours share
-- one numbered history.
SELECT 1;
