"""docker-compose.yml read against the code it starts (no Docker engine runs here).

Every service that runs our image must run a real `molo` subcommand, every MOLO_* variable must be a
setting the code reads, and every file mounted from the repo must exist (or be one that
`molo provision` creates). The services themselves are tested elsewhere by running the same commands:
migrate (test_migrations), ingest as a process (test_ingest), the API (test_ingest, test_demo) and
Mosquitto with this very broker_config (test_broker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from backend.settings import Environment, Settings
from molo.cli import build_parser
from molo.provision import DEFAULT_SERVICE_USERS, role_of

ROOT = Path(__file__).parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: s for name, s in SERVICES.items() if s.get("build") == "."}
#: Files `molo provision` and the TLS instructions create; never committed.
GENERATED = {"secrets/passwd", "secrets/acl", "secrets/credentials.json", "secrets/certs"}


def test_stack_has_the_services_the_design_names() -> None:
    """TimescaleDB, Mosquitto, migrations, at least two ingest workers and the API are all there."""
    assert SERVICES["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert SERVICES["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert {"migrate", "api"} <= set(OURS)
    assert len([n for n in OURS if n.startswith("ingest")]) >= 2


def test_timescaledb_image_is_a_release_the_migrations_support() -> None:
    """The pinned image is TimescaleDB 2.18 or newer (migration 0008 puts a transition-table trigger on
    the events hypertable) on PostgreSQL 15 or newer (NULLS NOT DISTINCT in 0004, 0008)."""
    tag = SERVICES["timescaledb"]["image"].split(":", 1)[1]
    version, pg = tag.split("-pg")
    assert tuple(int(n) for n in version.split(".")[:2]) >= (2, 18), tag
    assert int(pg) >= 15, tag


def test_every_backend_service_runs_a_real_molo_command() -> None:
    """Each service's command parses with the molo CLI (so a renamed option breaks this test)."""
    parser = build_parser()
    for name, service in OURS.items():
        args = parser.parse_args(service["command"])
        assert callable(args.func), name


def test_environment_variables_are_settings_the_code_reads() -> None:
    """Every MOLO_* variable set in compose is a field of backend.settings.Settings."""
    fields = {f"MOLO_{name.upper()}" for name in Settings.model_fields}
    for name, service in OURS.items():
        for key in service.get("environment", {}):
            assert key in fields, f"{name}: {key} is not a setting"


def test_ingest_workers_have_stable_distinct_ids() -> None:
    """Worker ids are fixed and unique: the broker queues each worker's share by its id."""
    ids = [s["environment"]["MOLO_WORKER_ID"] for n, s in OURS.items() if n.startswith("ingest")]
    assert len(ids) == len(set(ids))


def test_every_broker_client_has_a_provisioned_user_of_its_own() -> None:
    """Each service that connects to the broker logs in as a distinct user that `molo provision`
    creates by default and whose name gives it the right role (the broker binds client id to user)."""
    users = {n: s["environment"]["MOLO_MQTT_USERNAME"] for n, s in OURS.items() if n.startswith(("ingest", "api"))}
    assert len(set(users.values())) == len(users), users
    assert set(users.values()) <= set(DEFAULT_SERVICE_USERS)
    assert all(role_of(user) == ("api" if name == "api" else "ingest") for name, user in users.items())


def test_mounted_files_exist_or_are_generated() -> None:
    """Bind mounts point at broker_config/ files that exist, or at files provisioning generates."""
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                path = source[2:]
                assert (ROOT / path).exists() or path in GENERATED, f"{name}: {source} missing"
    for secret in COMPOSE["secrets"].values():
        assert secret["file"][2:] in GENERATED


def test_broker_config_in_compose_is_the_one_the_tests_start() -> None:
    """Mosquitto in compose mounts broker_config/mosquitto.conf, the file the test broker is built from."""
    mounts = SERVICES["mosquitto"]["volumes"]
    assert "./broker_config/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in mounts
    conf = (ROOT / "broker_config" / "mosquitto.conf").read_text()
    assert "password_file /mosquitto/config/passwd" in conf
    assert "acl_file /mosquitto/config/acl" in conf
    assert "allow_anonymous false" in conf


def test_production_settings_refuse_placeholders() -> None:
    """In production the settings refuse a placeholder broker password and missing services."""
    import pytest
    from pydantic import SecretStr, ValidationError

    prod = Environment.PRODUCTION
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(
            environment=prod, database_url="postgresql://db/molo", mqtt_host="mq", mqtt_password=SecretStr("changeme")
        )
    with pytest.raises(ValidationError, match="MOLO_DATABASE_URL"):
        Settings(environment=prod, mqtt_host="mq", mqtt_password=SecretStr("s3cr3t-but-real"))
    ok = Settings(
        environment=prod,
        database_url="postgresql://db/molo",
        mqtt_host="mq",
        mqtt_password=SecretStr("a-real-random-secret"),
    )
    assert ok.mqtt_secret() == "a-real-random-secret"


def test_volumes_of_our_image_exist_and_belong_to_its_user() -> None:
    """Named volumes mounted into our image point at directories the Dockerfile creates for its user."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "useradd --system --uid 10001" in dockerfile
    for name, service in OURS.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith("./"):
                assert f"mkdir -p {target} && chown molo:molo {target}" in dockerfile, f"{name}: {target}"


def test_readme_gives_every_mounted_secret_to_its_reader() -> None:
    """Provisioned files are 0600, so the README chowns each mounted one to the container user reading it."""
    readme = (ROOT / "README.md").read_text()
    assert "chown 1883:1883 secrets/passwd" in readme
    for secret in COMPOSE["secrets"].values():
        assert f"chown 10001:10001 {secret['file'][2:]}" in readme


def test_production_refuses_a_placeholder_password_from_the_credentials_file(tmp_path: Path) -> None:
    """A placeholder password read from MOLO_CREDENTIALS_FILE is refused in production as it is in
    MOLO_MQTT_PASSWORD; in development it is accepted."""
    import json

    import pytest

    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"services": {"ingest": "changeme"}}))
    prod = Settings(
        environment=Environment.PRODUCTION, database_url="postgresql://db/molo", mqtt_host="mq", credentials_file=creds
    )
    with pytest.raises(ValueError, match="is a placeholder"):
        prod.mqtt_secret()
    assert Settings(credentials_file=creds).mqtt_secret() == "changeme"
