"""Settings of every backend process, from the environment (prefix ``MOLO_``) or a ``.env`` file.

One ``Settings`` object, as in the FastAPI full-stack template: outside development it refuses
missing or placeholder secrets, so a production deployment cannot start on a default password.
"""

from __future__ import annotations

import json
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "password", "ingest"})


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class TimescaleMode(StrEnum):
    """Whether to use TimescaleDB: ``auto`` uses it when the extension can be created."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOLO_", env_file=".env", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT

    # --- storage
    database_url: str | None = Field(
        default=None, description="libpq URL; unset means the main job starts an embedded PostgreSQL"
    )
    timescale: TimescaleMode = TimescaleMode.AUTO
    db_pool_min: Annotated[int, Field(ge=1)] = 1
    db_pool_max: Annotated[int, Field(ge=1)] = 10

    # --- broker
    mqtt_host: str | None = Field(default=None, description="unset means the main job starts a broker")
    mqtt_port: Annotated[int, Field(ge=1, le=65535)] = 1883
    mqtt_username: str = "ingest"
    mqtt_password: SecretStr | None = None
    #: The backend's own MQTT connection (boxes speak MQTT 5 regardless). 3.1.1 by default: with
    #: Mosquitto it has everything ingest needs (persistent session, shared subscription, the
    #: broker's in-flight limit), and paho skips per-packet MQTT 5 property handling, measured at
    #: ~10% more events/s for one worker (docs/benchmarks.md). "5" adds session expiry and
    #: receive-maximum negotiation; both are tested.
    mqtt_protocol: Literal["5", "3.1.1"] = "3.1.1"
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    credentials_file: Path | None = Field(
        default=None, description="credentials.json written by `molo provision` (fallback for the password)"
    )

    # --- ingest
    worker_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "worker")
    ingest_batch_max: Annotated[int, Field(ge=1, le=50_000)] = 2000
    #: How long a batch waits to fill after its first message. Short: at low rates it is most of an
    #: event's latency to the API (10 ms: p50 51 ms against 93 ms at 50 ms), and at high rates batches
    #: grow anyway while the previous one is written (same throughput, docs/benchmarks.md).
    ingest_batch_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 10
    #: Session expiry asked of the broker, so messages queue for a worker that is down.
    ingest_session_expiry_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    #: Unacknowledged messages the broker may have in flight to one worker (MQTT 5 receive maximum).
    ingest_receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 5000
    ingest_metrics_port: int | None = None
    #: Subscribe through the shared subscription (several workers split the load). Only a single
    #: worker may run with this off.
    ingest_shared: bool = True

    # --- state
    #: A box that has sent nothing for this long is offline even without a Last Will
    #: (3 missed telemetry intervals of the default firmware).
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 90.0

    # --- operations: alerts, the monitor sweep, commands (backend/operations, docs/operations.md)
    #: Above this a box is too hot: aerosol cans in the red box are labelled "do not expose to
    #: temperatures above 50 °C" (EU Aerosol Dispensers Directive 75/324/EEC; DOMAIN.md: aerosols
    #: can burst when heated), so the alert comes 5 °C before that.
    alert_temperature_max_c: float = 45.0
    #: Below this a box is too cold: -20 °C is the low end of the usual outdoor parcel-locker
    #: operating range (locks, displays, batteries). Uncertain: a parameter.
    alert_temperature_min_c: float = -20.0
    #: A temperature alert clears only this far back inside the range, so a reading hovering at
    #: the threshold does not raise and clear on every telemetry.
    alert_temperature_hysteresis_c: Annotated[float, Field(ge=0)] = 2.0
    #: A red box at or above this share of its capacity (4 kg by default) is near its limit.
    alert_red_box_near_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.8
    #: How long a parcel waits before it goes back: 72 h, the simulator's pickup window
    #: (InPost UK / Amazon Hub 3 days; DOMAIN.md).
    parcel_pickup_window_h: Annotated[float, Field(gt=0)] = 72.0
    #: A parcel is near expiry this long before its window ends.
    alert_parcel_expiry_margin_h: Annotated[float, Field(ge=0)] = 12.0
    #: How often the monitor sweep runs (in the ingest worker): missed heartbeats, parcels near
    #: expiry, command timeouts.
    monitor_interval_s: Annotated[float, Field(gt=0)] = 5.0
    #: A command with no acknowledgement this long after it was sent ends ``timed_out``.
    command_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    #: How often the API ends overdue courier holds and tells their boxes to release the doors (the
    #: capacity query never counts an overdue hold; this is for the boxes). 0 turns the task off.
    reservation_sweep_interval_s: Annotated[float, Field(ge=0, le=3600)] = 15.0
    #: The sweep re-sends a release whose command is missing, failed or timed out: at most this many
    #: attempts per ended hold, the n-th retry ``reservation_release_retry_s * 2**(n-1)`` after the last.
    reservation_release_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    reservation_release_retry_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    # --- KPIs (backend/impact, docs/methodology.md)
    #: The network file whose depots and recycling stations the trip and CO2 method measures from
    #: (and box positions not registered in the database); unset = the bundled Aalborg network.
    network_file: Path | None = None

    # --- experiments over the API and `molo worker` (backend/experiments, docs/experiments.md)
    #: Results folders of experiment jobs, one per job (``<dir>/<id>``). The API reads what the
    #: workers write: every API process and every ``molo worker`` must see the same folder.
    experiments_dir: Path = Path("var/experiments/jobs")
    #: Largest job: design points; runs (points x replications, the maximum for sequential ones);
    #: simulated box-days (sum over points of replications x days x boxes). A year of 50 boxes is
    #: 18,250 box-days; the default box-days allow about 2,700 such replications per job.
    experiment_max_points: Annotated[int, Field(ge=1)] = 1000
    experiment_max_runs: Annotated[int, Field(ge=1)] = 20_000
    experiment_max_box_days: Annotated[int, Field(ge=1)] = 50_000_000
    #: Processes one job's replications run on (0: one per core).
    experiment_processes: Annotated[int, Field(ge=0, le=1024)] = 0
    #: Jobs one ``molo worker`` runs at once (each with ``experiment_processes`` processes).
    experiment_worker_concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    #: A worker's heartbeat interval; a worker silent for ``experiment_worker_stalled_s`` is taken for
    #: dead and the jobs it was running are resumed by another worker.
    experiment_worker_heartbeat_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    experiment_worker_stalled_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0

    # --- API
    #: The live stream sends a keepalive comment when quiet this long (checked every quarter of it),
    #: and the API checks this often that the keys of its open streams have not been revoked (a
    #: revoked key's stream ends with event ``revoked``).
    stream_keepalive_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    #: Open live streams one API key may hold in one API process; one more is refused with 429
    #: ``too_many_streams`` (a dashboard tab holds one; a control room's screens share a key).
    stream_max_per_key: Annotated[int, Field(ge=1)] = 20
    #: Open live streams in one API process, all keys together; one more is refused with 503
    #: ``streams_full``. Each is a socket: keep the process's open-file limit (``ulimit -n``) above it.
    stream_max_total: Annotated[int, Field(ge=1)] = 1000
    #: Request bodies over this many bytes are refused with 413 ``payload_too_large`` before they are
    #: read (backend/api/limits.py). 1 MiB: the largest legitimate body (a courier route of 100 stops,
    #: a reservation) is a few KiB.
    api_max_body_bytes: Annotated[int, Field(ge=0, le=1024**3)] = 1024 * 1024
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    #: API processes (``molo api --workers``): each has its own pool of ``db_pool_max`` connections,
    #: live-stream listener and command sender; one of them sweeps the reservations at a time. One
    #: per core is the usual choice (docs/architecture.md, "Growing").
    api_workers: Annotated[int, Field(ge=1, le=64)] = 1
    #: A valid key's lookup is kept this long per API process, so a request costs no key query. A
    #: revocation still takes effect at once: the database announces every change to a key
    #: (``molo_keys``) and each process drops it; while a process's listener is disconnected it
    #: does not use the cache, so this is also the most a revocation can be late. 0: no cache.
    api_key_cache_s: Annotated[float, Field(ge=0, le=300)] = 5.0

    @model_validator(mode="after")
    def _refuse_placeholders_outside_development(self) -> Self:
        if self.environment is Environment.DEVELOPMENT:
            return self
        if self.database_url is None:
            raise ValueError("MOLO_DATABASE_URL must be set outside development")
        if self.mqtt_host is None:
            raise ValueError("MOLO_MQTT_HOST must be set outside development")
        password = self.mqtt_password.get_secret_value() if self.mqtt_password else None
        if password is None and self.credentials_file is None:
            raise ValueError("MOLO_MQTT_PASSWORD (or MOLO_CREDENTIALS_FILE) must be set outside development")
        if password is not None and password.lower() in PLACEHOLDER_SECRETS:
            raise ValueError("MOLO_MQTT_PASSWORD is a placeholder; provision real credentials")
        return self

    def mqtt_secret(self) -> str:
        """The ingest password: from ``MOLO_MQTT_PASSWORD`` or the provisioned credentials file."""
        if self.mqtt_password is not None:
            return self.mqtt_password.get_secret_value()
        if self.credentials_file is not None:
            data = json.loads(self.credentials_file.read_text())
            services: dict[str, str] = data.get("services", {})
            if self.mqtt_username in services:
                secret = services[self.mqtt_username]
                if self.environment is not Environment.DEVELOPMENT and secret.lower() in PLACEHOLDER_SECRETS:
                    raise ValueError(
                        f"{self.credentials_file}: the password of {self.mqtt_username!r} is a placeholder"
                    )
                return secret
            raise ValueError(f"{self.credentials_file} has no password for {self.mqtt_username!r}")
        raise ValueError("no MQTT password: set MOLO_MQTT_PASSWORD or MOLO_CREDENTIALS_FILE")
