#!/usr/bin/env bash
# build.sh [build|test|demo|bench]: everything needed, from a fresh machine.
#   build    .venv (pinned deps), generated gRPC code, dist/ijr.pyz and its three symlinks
#   test     build, then the whole test suite, and its cgroup part again in a cgroup v2 VM
#            when ../shared/vm exists (with arguments: only pytest, with those arguments)
#   demo     build, then one real isolated job end to end on loopback
#   bench    build, then the benchmarks (bench/run.py; pass --quick for a smoke run)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python

venv() {
    # Reinstall only when the pins change; the stamp is the pyproject's hash.
    local stamp=$VENV/.pins
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -x "$PY" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "build: creating $VENV" >&2
        python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q $("$PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(p["dependencies"] + p["optional-dependencies"]["dev"]))')
        echo "$want" >"$stamp"
    fi
}

generate() {
    # Generated code lives apart from hand-written code, in ijr/gen/ (git-ignored).
    mkdir -p ijr/gen
    "$PY" -m grpc_tools.protoc --proto_path=ijr/gen=proto \
        --python_out=. --grpc_python_out=. ijr/gen/job.proto
    echo '"""Code generated from proto/job.proto by build.sh; do not edit."""' >ijr/gen/__init__.py
}

pyz() {
    rm -rf dist build/pyz && mkdir -p dist build/pyz
    local deps
    deps=$("$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
    "$PY" -m pip install -q --no-compile --target build/pyz $deps >build/pip.log 2>&1 || {
        cat build/pip.log >&2
        exit 1
    }
    cp -r ijr build/pyz/
    find build/pyz -name __pycache__ -prune -exec rm -rf {} +
    "$VENV/bin/shiv" --compile-pyc --reproducible --site-packages build/pyz \
        -p '/usr/bin/env python3' -e ijr.__main__:main -o dist/ijr.pyz >/dev/null
    for name in ijrd ijrctl ijrtoken; do ln -sf ijr.pyz "dist/$name"; done
    echo "build: dist/ijr.pyz ($(du -h dist/ijr.pyz | cut -f1)) and symlinks ijrd, ijrctl, ijrtoken" >&2
}

build() { venv; generate; pyz; }

demo() {
    # The shipped file itself, through its symlinks: init, ijrd on loopback, one isolated job.
    local tmp port pid status=0
    tmp=$(mktemp -d /tmp/ijr-demo.XXXXXX)
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    dist/ijr.pyz init --dir "$tmp/etc" --config "$tmp/ijrctl-config" --port "$port" >"$tmp/ijrd-command"
    echo "demo: starting $(cat "$tmp/ijrd-command") --listen 127.0.0.1 --state-dir $tmp/state" >&2
    dist/ijrd $(cat "$tmp/ijrd-command" | cut -d' ' -f2-) --listen 127.0.0.1 --state-dir "$tmp/state" \
        2>"$tmp/ijrd.log" &
    pid=$!
    for _ in $(seq 100); do grep -q "serving on" "$tmp/ijrd.log" 2>/dev/null && break; sleep 0.1; done
    echo "demo: ijrctl start --command ps --arg -ef --output" >&2
    dist/ijrctl --config "$tmp/ijrctl-config" start --command ps --arg -ef --output || status=$?
    kill -TERM "$pid" && wait "$pid" || status=$?
    rm -rf "$tmp"
    return "$status"
}

case "${1:-build}" in
build) build ;;
test)
    build
    shift
    [ $# -eq 0 ] || exec "$PY" -m pytest -q "$@"
    "$PY" -m pytest -q
    if [ -x ../shared/vm/run-in-vm ]; then
        echo "build: the cgroup, limit and isolation tests again, in a pure cgroup v2 VM" >&2
        ../shared/vm/run-in-vm --timeout 2400 -- "$PY" -m pytest -q -p no:cacheprovider -m cgroup tests/
    else
        echo "build: ../shared/vm/run-in-vm not found: the cgroup v2 tests did not run" >&2
    fi
    ;;
demo) build; demo ;;
bench) build; shift; exec "$PY" bench/run.py "$@" ;;
*) echo "usage: $0 [build|test|demo|bench]" >&2; exit 2 ;;
esac
