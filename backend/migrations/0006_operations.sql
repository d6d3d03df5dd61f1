-- 0006_operations: what operators watch and steer (issue 5): alerts, red-box contents, maintenance.
--
-- Same on both storage flavours (plain tables, no time-series partitioning): alerts are few and
-- kept for ever as the record of what was raised, cleared and acknowledged.

-- Alerts raised and cleared from ingested data (backend/operations/alerts.py) and by the periodic
-- sweep (backend/operations/monitor.py). A row is one episode: raised, then cleared once.
CREATE TABLE alerts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    box_id           text NOT NULL,
    kind             text NOT NULL CHECK (kind IN (
                         'box_offline', 'door_left_open', 'compartment_fault', 'red_box_near_limit',
                         'red_box_at_limit', 'temperature_out_of_range', 'parcel_near_expiry')),
    -- What in the box it is about: '' for the whole box, the door number, or the parcel id.
    subject          text NOT NULL DEFAULT '',
    compartment      smallint,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    message          text NOT NULL,
    details          jsonb NOT NULL DEFAULT '{}',
    raised_at        timestamptz NOT NULL DEFAULT now(),   -- backend wall clock
    raised_ts        timestamptz,                          -- device time of the evidence, if any
    raised_by        text NOT NULL,                        -- e.g. 'event door.left_open seq 42'
    -- Position of the raising evidence in the box's own order: the event/telemetry seq, or for
    -- box_offline the status session. A clearing message must be newer than this.
    raised_seq       bigint,
    raised_session   bigint,
    cleared_at       timestamptz,
    cleared_ts       timestamptz,
    cleared_by       text,
    cleared_seq      bigint,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    CHECK ((cleared_at IS NULL) = (cleared_by IS NULL)),
    CHECK ((acknowledged_at IS NULL) = (acknowledged_by IS NULL))
);
-- At most one open alert per (box, kind, subject): raising again while open is a no-op.
CREATE UNIQUE INDEX alerts_one_open ON alerts (box_id, kind, subject) WHERE cleared_at IS NULL;
CREATE INDEX alerts_box_raised ON alerts (box_id, raised_at DESC);
CREATE INDEX alerts_raised ON alerts (raised_at DESC);

-- What is in each red box since its last collection, kept by ingest in the batch transaction:
-- recomputed from the stored waste.deposited events with a seq above the last waste.collected, so
-- redeliveries and late events never count twice.
CREATE TABLE red_box_fill (
    box_id          text NOT NULL,
    compartment     smallint NOT NULL,
    collected_seq   bigint NOT NULL DEFAULT 0,   -- seq of the newest waste.collected (0: never)
    collected_ts    timestamptz,
    deposited_kg    double precision NOT NULL DEFAULT 0,
    deposits        integer NOT NULL DEFAULT 0,
    fractions       jsonb NOT NULL DEFAULT '{}',  -- {"batteries": 0.4, ...} in kg
    last_seq        bigint NOT NULL DEFAULT 0,    -- newest deposit counted
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (box_id, compartment)
);

-- Box-wide maintenance, as confirmed by the box's acknowledgement of a set_maintenance command
-- (the newest such command wins, whatever order the acks arrive in).
ALTER TABLE box_state
    ADD COLUMN maintenance boolean NOT NULL DEFAULT false,
    ADD COLUMN maintenance_since timestamptz,
    ADD COLUMN maintenance_command_at timestamptz;

CREATE INDEX commands_open_expiry ON commands (expires_at) WHERE status IN ('pending', 'sent');
