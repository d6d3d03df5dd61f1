-- 0004 (plain PostgreSQL): the events the trip and CO2 method reads, counted per UTC day, box,
-- carrier, type and size class (accounting/activity.py). A view with the same columns as the
-- TimescaleDB continuous aggregate, so the API's query (backend/impact/repository.py) is identical on
-- both paths. It reads only the types the method counts, through events_type_ts.
CREATE VIEW activity_daily AS
SELECT date_trunc('day', ts, 'UTC') AS bucket,
       box_id,
       carrier,
       type,
       size_class,
       count(*)::bigint                AS events,
       coalesce(sum(weight_kg), 0)     AS weight_kg
FROM events
WHERE type IN ('parcel.deposited', 'parcel.collected', 'parcel.expired', 'parcel.dropped_off',
               'parcel.picked_up', 'waste.deposited', 'waste.collected')
GROUP BY 1, 2, 3, 4, 5;
