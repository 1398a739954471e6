#!/usr/bin/env bash
# Wheel smoke test, called by .ci/run: build the default wheel (pure Python, sources inside, built
# in pip's isolated environment) and the ahead-of-time one (BELM_KERNELS_AOT=1, kernels compiled
# against this environment's torch), install each into a fresh virtual environment outside the
# checkout, and check there that `belm-kernels backends` lists the compiled cpu backend and that
# an O-BELM round trip through it runs (.ci/wheel_smoke.py). The ahead-of-time wheel is checked
# with no compiler and no ninja reachable.
#
# Needs: this environment's python with torch (CI's), a C++ compiler. Prints wheel sizes and the
# time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/belm-wheel-smoke.XXXXXX")
trap 'rm -rf "$WORK"; rm -rf "$REPO/build"' EXIT
SECONDS=0
step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }
fail() { echo "wheel smoke FAILED: $*" >&2; exit 1; }

step "default wheel (isolated build: setuptools only, no torch)"
rm -rf build   # pip builds in the tree; never mix two builds' outputs
python -m pip wheel -q --no-deps -w "$WORK/default" .
step "ahead-of-time wheel (BELM_KERNELS_AOT=1, no build isolation)"
rm -rf build
python -m pip install -q "setuptools>=68" ninja
BELM_KERNELS_AOT=1 python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/aot" .
rm -rf build
DEFAULT_WHL=$(ls "$WORK"/default/*.whl)
AOT_WHL=$(ls "$WORK"/aot/*.whl)
ls -l "$DEFAULT_WHL" "$AOT_WHL"
case "$DEFAULT_WHL" in *-py3-none-any.whl) ;; *) fail "default wheel is not pure Python";; esac

# torch (and the other run-time dependencies) once, in a directory both fresh environments see
# through a .pth file, instead of installing ~1 GB twice. It holds no ninja and no belm_kernels.
step "shared run-time dependencies (torch==2.13.0, numpy, tqdm)"
python -m pip install -q --target "$WORK/deps" torch==2.13.0 numpy tqdm
[ ! -e "$WORK/deps/ninja" ] || fail "ninja is in the shared dependencies"

new_venv() {  # new_venv DIR: a fresh virtual environment that sees $WORK/deps
    python -m venv "$1"
    local site
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$WORK/deps" > "$site/belm_smoke_deps.pth"
}

step "default wheel: fresh venv, JIT build at first use"
new_venv "$WORK/venv-default"
"$WORK/venv-default/bin/python" -m pip install -q "$DEFAULT_WHL[build]"   # [build]: ninja
cd "$WORK"   # outside the checkout: belm_kernels must come from the environment
export BELM_KERNELS_BUILD_DIR="$WORK/jit-cache"
"$WORK/venv-default/bin/python" "$REPO/.ci/wheel_smoke.py" jit 2> "$WORK/default.err" \
    || { cat "$WORK/default.err"; fail "default wheel"; }
cat "$WORK/default.err"
grep -q "compiling the cpu extension" "$WORK/default.err" || fail "the JIT build was not announced"
"$WORK/venv-default/bin/belm-kernels" backends | tee "$WORK/default.backends"
grep -Eq '^cpu +cpu +available \(built just in time' "$WORK/default.backends" \
    || fail "default wheel: cpu not listed"
unset BELM_KERNELS_BUILD_DIR

step "ahead-of-time wheel: fresh venv, no compiler, no ninja"
new_venv "$WORK/venv-aot"
"$WORK/venv-aot/bin/python" -m pip install -q "$AOT_WHL"
! "$WORK/venv-aot/bin/python" -c "import ninja" 2>/dev/null \
    || fail "ninja is installed in the AOT venv"
BARE=(env -i "HOME=$WORK" "PATH=$WORK/venv-aot/bin" "CC=/nonexistent/cc" "CXX=/nonexistent/c++"
      "BELM_KERNELS_BUILD_DIR=$WORK/aot-cache")
"${BARE[@]}" /bin/sh -c "command -v python" >/dev/null || fail "the bare environment does not run"
for tool in gcc g++ c++ cc clang clang++ ninja nvcc; do
    ! "${BARE[@]}" /bin/sh -c "command -v $tool" >/dev/null 2>&1 || fail "$tool is reachable"
done
"${BARE[@]}" "$WORK/venv-aot/bin/python" "$REPO/.ci/wheel_smoke.py" prebuilt
"${BARE[@]}" "$WORK/venv-aot/bin/belm-kernels" backends | tee "$WORK/aot.backends"
grep -Eq '^cpu +cpu +available \(prebuilt library' "$WORK/aot.backends" \
    || fail "AOT wheel: cpu not listed"
[ ! -e "$WORK/aot-cache" ] || fail "the AOT install tried a JIT build"

step "wheel smoke passed"
