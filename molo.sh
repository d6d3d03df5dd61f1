#!/usr/bin/env bash
# The project's one entry script: installs what the project needs, then runs it.
#
#   ./molo.sh demo        the main job (services, ingest, API, boxes) on embedded defaults
#   ./molo.sh test        the whole test suite (pytest arguments may follow)
#   ./molo.sh <command>   any `molo` command, e.g. ./molo.sh migrate, ./molo.sh --help
#
# Needs only Python 3.11+. It installs uv (pinned) into .tools/ unless uv is already on PATH, then
# creates .venv from uv.lock (exact versions). Tests also need the Mosquitto binary: when it is
# missing and we are root on Debian/Ubuntu, it is installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")"

UV_VERSION="0.13.8"

find_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "molo.sh: Python 3.11 or newer is needed and was not found" >&2
    return 1
}

find_uv() {
    if command -v uv >/dev/null 2>&1; then echo uv; return 0; fi
    if [ -x .tools/bin/uv ]; then echo .tools/bin/uv; return 0; fi
    local py; py="$(find_python)"
    echo "molo.sh: installing uv $UV_VERSION into .tools/ (once)" >&2
    if "$py" -m venv .tools >/dev/null 2>&1; then
        .tools/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
    else
        rm -rf .tools
        "$py" -m pip install --quiet --disable-pip-version-check --target .tools/lib "uv==$UV_VERSION" >&2
        mkdir -p .tools/bin && ln -sf ../lib/bin/uv .tools/bin/uv
    fi
    echo .tools/bin/uv
}

ensure_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -n "${MOLO_MOSQUITTO_BIN:-}" ]; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "molo.sh: installing mosquitto with apt-get (the tests start their own broker)" >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >&2
    else
        echo "molo.sh: the tests need the mosquitto binary: install it (e.g. apt-get install mosquitto)" >&2
        return 1
    fi
}

UV="$(find_uv)"
export UV_PYTHON_DOWNLOADS=never
# Trust the machine's certificate store (and so any corporate or proxy CA installed there), unless
# the caller already points uv at a bundle.
if [ -z "${SSL_CERT_FILE:-}" ] && [ -z "${UV_SYSTEM_CERTS:-}" ]; then
    export UV_SYSTEM_CERTS=1
fi
"$UV" sync --frozen --quiet

case "${1:-}" in
    test)
        shift
        ensure_mosquitto
        exec "$UV" run --frozen --no-sync pytest "$@"
        ;;
    "")
        exec "$UV" run --frozen --no-sync molo --help
        ;;
    *)
        exec "$UV" run --frozen --no-sync molo "$@"
        ;;
esac
