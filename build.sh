#!/usr/bin/env bash
# build.sh [build|test|demo|bench|vm-test]: everything needed, from a fresh machine.
#   build    .venv (pinned deps), generated gRPC code, dist/ijr.pyz and its three symlinks
#   test     build, then the whole test suite (cgroup v2 part in the VM when ../shared/vm exists)
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
        "$PY" -m pip install -q $("$PY" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PYEOF
)
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
    "$PY" -m pip install -q --no-compile --target build/pyz --no-deps \
        $("$PY" - <<'PYEOF'
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PYEOF
) 2>&1 | grep -v 'already exists' >&2 || true
    cp -r ijr build/pyz/
    find build/pyz -name __pycache__ -prune -exec rm -rf {} +
    "$VENV/bin/shiv" --compile-pyc --reproducible --site-packages build/pyz \
        -p '/usr/bin/env python3' -e ijr.__main__:main -o dist/ijr.pyz >/dev/null
    for name in ijrd ijrctl ijrtoken; do ln -sf ijr.pyz "dist/$name"; done
    echo "build: dist/ijr.pyz ($(du -h dist/ijr.pyz | cut -f1)) and symlinks ijrd, ijrctl, ijrtoken" >&2
}

build() { venv; generate; pyz; }

case "${1:-build}" in
build) build ;;
test)
    build
    shift
    exec "$PY" -m pytest -q "$@"
    ;;
demo) build; exec "$PY" -m ijr.demo ;;
bench) build; shift; exec "$PY" bench/run.py "$@" ;;
*) echo "usage: $0 [build|test|demo|bench]" >&2; exit 2 ;;
esac
