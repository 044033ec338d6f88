#!/usr/bin/env bash
# Idempotent set-up shared by `make demo` and `make test`: a Python 3.11 venv at .venv with
# torch/torchvision, Detectron2, the runtime dependencies and this package (editable).
# Re-running is cheap: a stamp records the hash of the inputs that shaped the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.ohem_d2_setup"
want=$(cat scripts/setup.sh requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)

link_model_zoo_configs() {
    # configs/model_zoo -> Detectron2's bundled model-zoo configs, so that plain
    # merge_from_file resolves our configs' "model_zoo/..." bases in a clone too
    # (ohem_d2.model_zoo.merge_config_file resolves them without the link).
    local zoo
    zoo=$("$VENV/bin/python" -c "import detectron2, os; print(os.path.join(os.path.dirname(detectron2.__file__), 'model_zoo', 'configs'))")
    [ -d "$zoo" ] && ln -sfn "$zoo" configs/model_zoo
}

fetch_jemalloc() {
    # jemalloc keeps a long CPU training run's memory flat where glibc's malloc fragments
    # (benchmarks/soak.md); train_net.py and the demo use it when found. Optional: without
    # it, training runs on the system allocator.
    local dest="$VENV/lib/jemalloc" lib tmp
    [ -f "$dest/libjemalloc.so.2" ] && return 0
    mkdir -p "$dest"
    lib=$( (/sbin/ldconfig -p 2>/dev/null || true) | awk '/libjemalloc\.so\.2 / {print $NF; exit}')
    if [ -n "$lib" ]; then
        ln -sfn "$lib" "$dest/libjemalloc.so.2"
    elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
        # Debian's package, unpacked into the venv: no root and no system change needed.
        tmp=$(mktemp -d)
        if (cd "$tmp" && timeout 300 apt-get download -qq libjemalloc2 >/dev/null 2>&1); then
            dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$tmp/root"
            lib=$(find "$tmp/root" -name libjemalloc.so.2 | head -n 1)
            [ -n "$lib" ] && cp -L "$lib" "$dest/libjemalloc.so.2"
        fi
        rm -rf "$tmp"
    fi
    [ -f "$dest/libjemalloc.so.2" ] ||
        echo "note: jemalloc not found; training uses the system allocator (benchmarks/soak.md)"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import ohem_d2" 2>/dev/null; then
    [ -e configs/model_zoo ] || link_model_zoo_configs
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

# torch first: any later package asking for torch then finds it satisfied, so pip never
# reaches for a multi-GB build other than the pinned one.
pip install -q "torch==2.14.1" "torchvision==0.29.1"

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    # Detectron2 is not on PyPI under its own name. sal-detectron2 is a wheel of upstream's
    # Python sources tagged cp310; its compiled _C cannot load here and nothing of ours
    # needs it. Users with upstream access may instead install Detectron2 from source first;
    # this step then keeps theirs.
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    pip install -q --no-deps --only-binary=:all: --python-version 3.10 \
        --target "$site" --upgrade "sal-detectron2==0.7.2"
    # The wheel also ships upstream's scripts as a top-level package `tools`, which would
    # shadow any other package of that name.
    rm -rf "$site/tools"
fi

pip install -q -r requirements.txt -r requirements-dev.txt
# torch pulls a newer setuptools; Detectron2's model_zoo needs pkg_resources (< 81).
pip install -q "setuptools>=77.0.3,<81"
pip install -q --no-deps --no-build-isolation -e .

link_model_zoo_configs
fetch_jemalloc
echo "$want" > "$STAMP"
echo "set-up complete: $VENV"
