-- 0004 (plain PostgreSQL): the events the trip and CO2 method reads, counted per UTC day, box,
-- carrier, type and size class (accounting/activity.py): a rollup table with the same columns as
-- the TimescaleDB continuous aggregate, so the API's query (backend/impact/repository.py) is the
-- same on both paths and a year of KPIs reads box-days, not every event.
--
-- It is kept by a statement-level trigger on events, in the inserting transaction: only rows that
-- were really inserted are in the transition table (a replayed (box, seq) skipped by ON CONFLICT
-- DO NOTHING is not), so the counts are exact under redelivery, like the events themselves. Keys
-- are upserted in sorted order, so concurrent ingest workers lock them in the same order.
CREATE TABLE activity_daily (
    bucket      timestamptz NOT NULL,
    box_id      text NOT NULL,
    carrier     text,
    type        text NOT NULL,
    size_class  text,
    events      bigint NOT NULL,
    weight_kg   double precision NOT NULL
);
-- NULLS NOT DISTINCT (PostgreSQL 15): one row per key even where carrier or size class is null.
CREATE UNIQUE INDEX activity_daily_key ON activity_daily (bucket, box_id, carrier, type, size_class) NULLS NOT DISTINCT;

CREATE FUNCTION molo_count_activity() RETURNS trigger LANGUAGE plpgsql AS $fn$
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

-- Events stored before this migration.
INSERT INTO activity_daily (bucket, box_id, carrier, type, size_class, events, weight_kg)
SELECT date_trunc('day', ts, 'UTC'), box_id, carrier, type, size_class, count(*), coalesce(sum(weight_kg), 0)
FROM events
WHERE type IN ('parcel.deposited', 'parcel.collected', 'parcel.expired', 'parcel.dropped_off',
               'parcel.picked_up', 'waste.deposited', 'waste.collected')
GROUP BY 1, 2, 3, 4, 5;
