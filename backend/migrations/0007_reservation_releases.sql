-- 0007_reservation_releases: the periodic sweeper (backend/api/couriers.py) sends the release of an
-- ended hold (expired or cancelled) whose release_compartment command is missing, failed or timed
-- out, a bounded number of times with a growing pause, so a door is not left held at the box.
ALTER TABLE reservations ADD COLUMN release_attempts smallint NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD COLUMN release_retry_at timestamptz;
CREATE INDEX reservations_release_due ON reservations (ended_at) WHERE status IN ('expired', 'cancelled');
