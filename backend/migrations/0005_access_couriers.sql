-- 0005: API keys (roles), courier reservations of compartments, and the index the courier
-- capacity query uses. Same on both storage flavours.

-- API keys. Only the SHA-256 of the token is stored; key_id is the token's public part (lookup,
-- display, revocation). A courier key is bound to exactly one carrier; no other role has one.
CREATE TABLE api_keys (
    key_id         text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{10}$'),
    name           text NOT NULL,
    role           text NOT NULL CHECK (role IN ('operator', 'courier', 'researcher')),
    carrier        text,
    secret_sha256  text NOT NULL CHECK (length(secret_sha256) = 64),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    CHECK ((role = 'courier') = (carrier IS NOT NULL))
);

-- A courier's hold on one compartment for one parcel, until expires_at. Overbooking is impossible
-- in the database itself: at most one active hold per (box, compartment) and per (carrier, parcel).
-- Expired holds still marked 'active' are turned 'expired' (lazily, and by the sweep) before a new
-- hold is taken, inside the same transaction that holds the box's advisory lock. 'fulfilled': the
-- parcel went in; 'rejected': the box refused the reserve_compartment command.
CREATE TABLE reservations (
    reservation_id      uuid PRIMARY KEY,
    box_id              text NOT NULL,
    compartment         smallint NOT NULL,
    size_class          text NOT NULL,
    carrier             text NOT NULL,
    parcel_id           text NOT NULL,
    height_mm           integer,
    width_mm            integer,
    depth_mm            integer,
    status              text NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'cancelled', 'expired', 'fulfilled', 'rejected')),
    created_by          text NOT NULL,             -- api_keys.key_id
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    ended_at            timestamptz,
    command_id          uuid,                      -- the reserve_compartment command (commands table)
    release_command_id  uuid,                      -- the release_compartment command, once ended
    CHECK (expires_at > created_at)
);
CREATE UNIQUE INDEX reservations_one_active_hold ON reservations (box_id, compartment) WHERE status = 'active';
CREATE UNIQUE INDEX reservations_one_active_parcel ON reservations (carrier, parcel_id) WHERE status = 'active';
CREATE INDEX reservations_carrier_created ON reservations (carrier, created_at DESC);
CREATE INDEX reservations_active_expiry ON reservations (expires_at) WHERE status = 'active';

-- The capacity query filters boxes by a latitude/longitude bounding box before the exact distance;
-- with box_id included that is an index-only scan (the wide layout column is never read for it).
CREATE INDEX boxes_lat_lon ON boxes (latitude, longitude) INCLUDE (box_id);
