# The backend image: one image, several roles (migrate, ingest, api, worker, boxes), chosen by the command.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PATH="/app/.venv/bin:$PATH"

RUN pip install --no-cache-dir "uv==0.13.8" \
 && useradd --system --uid 10001 --home-dir /app molo
WORKDIR /app

# Dependencies first (cached layer), exactly as locked; no dev tools in the image.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY contract ./contract
COPY accounting ./accounting
COPY network ./network
COPY firmware_stub ./firmware_stub
COPY backend ./backend
COPY simulator ./simulator
COPY molo ./molo
COPY broker_config ./broker_config
RUN uv sync --frozen --no-dev \
 && mkdir -p /app/state && chown molo:molo /app/state \
 && mkdir -p /app/var/experiments/jobs && chown molo:molo /app/var/experiments/jobs
# Volumes: /app/state the firmware stubs' outboxes; /app/var/experiments/jobs the experiment jobs' results.

USER molo
ENTRYPOINT ["molo"]
CMD ["--help"]
