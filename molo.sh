#!/usr/bin/env bash
# The project's one entry script: installs what the project needs, then runs it.
#
#   ./molo.sh demo        the main job (services, ingest, API, boxes) on embedded defaults
#   ./molo.sh test        the whole test suite (pytest arguments may follow)
#   ./molo.sh <command>   any `molo` command, e.g. ./molo.sh migrate, ./molo.sh --help
#
# Needs only Python 3.11+. It installs uv (pinned) into .tools/ unless a recent enough uv is on PATH
# (with pip if the Python has it, else by downloading the wheel from PyPI and checking its sha256),
# then creates .venv from uv.lock (exact versions). MOLO_UV_BOOTSTRAP=download forces the download. Tests also need the Mosquitto binary
# and Chromium (the dashboard's browser test): when missing and we are root on Debian/Ubuntu, they are installed with apt-get.
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

uv_recent_enough() {  # $1 = a uv binary; true if its version >= $UV_VERSION
    local have
    have="$("$1" --version 2>/dev/null | awk '{print $2}')" || return 1
    [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$UV_VERSION" "$have" | sort -V | head -n1)" = "$UV_VERSION" ]
}

download_uv() {  # stdlib only: for a Python without pip and venv (e.g. Debian's bare python3)
    "$1" - "$UV_VERSION" <<'PY'
import hashlib, io, json, os, platform, sys, urllib.parse, urllib.request, zipfile
version = sys.argv[1]
arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine().lower())
if not sys.platform.startswith("linux") or arch is None:
    sys.exit("molo.sh: cannot bootstrap uv on this platform without pip; install uv (https://docs.astral.sh/uv/)")
# The simple index (PEP 691 JSON), as pip reads it: file names, URLs and sha256 hashes.
index = os.environ.get("UV_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
request = urllib.request.Request(f"{index.rstrip('/')}/uv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(request, timeout=60) as response:
    files = json.load(response)["files"]
prefix = f"uv-{version}-"
wheels = [f for f in files if f["filename"].startswith(prefix) and f["filename"].endswith(".whl")
          and "manylinux" in f["filename"] and arch in f["filename"]]
if not wheels:
    sys.exit(f"molo.sh: the index has no manylinux {arch} wheel of uv {version}")
wheel = wheels[0]
with urllib.request.urlopen(urllib.parse.urljoin(f"{index}/uv/", wheel["url"]), timeout=300) as response:
    data = response.read()
if hashlib.sha256(data).hexdigest() != wheel["hashes"]["sha256"]:
    sys.exit("molo.sh: the downloaded uv wheel does not match PyPI's sha256; not using it")
with zipfile.ZipFile(io.BytesIO(data)) as archive:
    member = next(n for n in archive.namelist() if n.endswith(".data/scripts/uv"))
    os.makedirs(".tools/bin", exist_ok=True)
    with open(".tools/bin/uv", "wb") as out:
        out.write(archive.read(member))
os.chmod(".tools/bin/uv", 0o755)
PY
}

find_uv() {
    if [ "${MOLO_UV_BOOTSTRAP:-}" != "download" ]; then
        if command -v uv >/dev/null 2>&1 && uv_recent_enough uv; then echo uv; return 0; fi
    fi
    if [ -x .tools/bin/uv ] && uv_recent_enough .tools/bin/uv; then echo .tools/bin/uv; return 0; fi
    local py; py="$(find_python)"
    rm -rf .tools
    echo "molo.sh: installing uv $UV_VERSION into .tools/ (once)" >&2
    if [ "${MOLO_UV_BOOTSTRAP:-}" = "download" ]; then
        download_uv "$py" >&2
    elif "$py" -m venv .tools >/dev/null 2>&1 && .tools/bin/python -m pip --version >/dev/null 2>&1; then
        .tools/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
    elif "$py" -m pip --version >/dev/null 2>&1; then
        rm -rf .tools
        "$py" -m pip install --quiet --disable-pip-version-check --target .tools/lib "uv==$UV_VERSION" >&2
        mkdir -p .tools/bin && ln -sf ../lib/bin/uv .tools/bin/uv
    else
        rm -rf .tools
        download_uv "$py" >&2
    fi
    echo .tools/bin/uv
}

ensure_apt() {  # $1 = package, $2 = why: install it with apt-get when root (or passwordless sudo) on Debian/Ubuntu
    local sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
    if { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; } && command -v apt-get >/dev/null 2>&1; then
        echo "molo.sh: installing $1 with apt-get ($2)" >&2
        $sudo apt-get update -qq >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2
    else
        echo "molo.sh: $2 needs $1: install it (e.g. apt-get install $1)" >&2
        return 1
    fi
}

ensure_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -n "${MOLO_MOSQUITTO_BIN:-}" ]; then
        return 0
    fi
    ensure_apt mosquitto "the tests start their own broker"
}

ensure_chromium() {  # the dashboard's browser test drives Debian's chromium (Playwright never downloads one)
    if [ -x /usr/bin/chromium ] || [ -n "${MOLO_CHROMIUM_BIN:-}" ]; then
        return 0
    fi
    ensure_apt chromium "the dashboard's browser test"
}

UV="$(find_uv)"
export UV_PYTHON_DOWNLOADS=never
# Trust the machine's certificate store (and so any corporate or proxy CA installed there), unless
# the caller already points uv at a bundle.
if [ -z "${SSL_CERT_FILE:-}" ] && [ -z "${UV_SYSTEM_CERTS:-}" ]; then
    export UV_SYSTEM_CERTS=1
fi
# Every extra too: the experiment runner's Dask and Ray executors are optional for users, but the
# tests run them.
"$UV" sync --frozen --quiet --all-extras

case "${1:-}" in
    test)
        shift
        ensure_mosquitto
        ensure_chromium
        exec "$UV" run --frozen --no-sync pytest "$@"
        ;;
    "")
        exec "$UV" run --frozen --no-sync molo --help
        ;;
    *)
        exec "$UV" run --frozen --no-sync molo "$@"
        ;;
esac
