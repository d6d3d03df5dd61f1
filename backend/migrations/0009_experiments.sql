-- 0009_experiments: what-if experiments submitted over the API (backend/experiments, docs/experiments.md
-- "Over the API"). One row per job: the experiment file as submitted, its size, where it stands and
-- why it ended. The queue itself is procrastinate's own schema (procrastinate_jobs and friends,
-- installed by backend/experiments/schema.py from `molo migrate`); job_id names the procrastinate
-- job that runs this experiment (no foreign key: that table is the library's). The results live in
-- the job's results folder (MOLO_EXPERIMENTS_DIR/<id>), written by the runner.
CREATE TABLE experiments (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                 text NOT NULL,
    description          text NOT NULL DEFAULT '',
    source               text NOT NULL,
    status               text NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    points               integer NOT NULL CHECK (points > 0),
    -- Finished replications (stored in runs/), and how many the runner wants now: fixed n x points,
    -- or for sequential replications the current target, which may grow up to replications_max.
    replications_done    integer NOT NULL DEFAULT 0,
    replications_target  integer NOT NULL,
    replications_max     integer NOT NULL,
    box_days             bigint NOT NULL,
    submitted_by         text REFERENCES api_keys (key_id),
    job_id               bigint,
    attempts             integer NOT NULL DEFAULT 0,
    error                text,
    report               text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz,
    cancel_requested_at  timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX experiments_newest ON experiments (created_at DESC, id DESC);
CREATE INDEX experiments_job ON experiments (job_id);
