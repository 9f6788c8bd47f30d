#!/usr/bin/env bash
# `make compat`: the CPU + Triton-interpreter checks with the GPU machine's stack (Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0) instead of the pinned .venv's, on a copy of the committed tree.
#
#   1. venv COMPAT_VENV (default .venv-compat, git-ignored), made with COMPAT_PYTHON when missing;
#      COMPAT_PINS installed with pip when they changed (first time: a ~5 GB download, minutes).
#      numpy < 2.4: triton 3.6's interpreter converts a loop bound that is a kernel argument (a
#      1-element array) with int(), an error from numpy 2.4 on (triton 3.8 squeezes it first). The
#      GPU machine has numpy 2.5, so its interpreter cannot run these kernels: there the Triton
#      tests run compiled, with TRITON_INTERPRET=0 (make gpu-check).
#   2. COMPAT_REV (default HEAD; uncommitted changes are not included) extracted with git archive
#      into COMPAT_TREE (default /tmp/resfused-compat-tree); resfused._C built there against the
#      venv's torch, CPU kernels only (RESFUSED_SKIP_CUDA_BUILD=1; 5-10 min on 2 cores), and kept
#      while csrc/ and setup.py are unchanged.
#   3. pytest -m "$COMPAT_MARK" (default "not gpu and not slow") on COMPAT_TESTS with
#      TRITON_INTERPRET=1 and RESFUSED_REQUIRE_NATIVE=1. The default subset is where the stacks
#      differ for the GPU path: every Triton test (interpreter numerics of every variant and every
#      autotune config, the offline sm_80/sm_90 compile with ptxas), the torch.library op
#      registration and the backend choice: 173 tests, ~3 min on 2 cores.
#      The whole CPU + Triton-interpreter suite: `make compat COMPAT_TESTS=tests` (1420 tests with
#      the default mark on this stack; 54 min measured on 2 Emerald Rapids cores shared with other
#      jobs, run niced, after the build). It found what the subset cannot: oneDNN's binary
#      post-op and Dynamo's str subclasses differ under torch 2.11 (conv_onednn.py, base.py).
#
# Not part of `make test` or CI: it downloads a second torch and builds a second extension.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPAT_PYTHON=${COMPAT_PYTHON:-python3.12}
COMPAT_VENV=${COMPAT_VENV:-$ROOT/.venv-compat}
COMPAT_TREE=${COMPAT_TREE:-/tmp/resfused-compat-tree}
COMPAT_REV=${COMPAT_REV:-HEAD}
PINS="torch==2.11.0 triton==3.6.0 torchvision==0.26.* numpy<2.4 pytest hypothesis ninja setuptools wheel timm tabulate"
COMPAT_PINS=${COMPAT_PINS:-$PINS}
TESTS="tests/test_triton_conv.py tests/test_triton_configs.py tests/test_triton_compile.py"
TESTS+=" tests/test_registration.py tests/test_backend.py"
COMPAT_TESTS=${COMPAT_TESTS:-$TESTS}
COMPAT_MARK=${COMPAT_MARK:-not gpu and not slow}
PY=$COMPAT_VENV/bin/python

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

# 1. the venv
if [ ! -x "$PY" ]; then
    python=""
    if is_312 "$COMPAT_PYTHON"; then
        python=$COMPAT_PYTHON
    elif [ "$COMPAT_PYTHON" = python3.12 ]; then # not given: a pyenv install or the system's
        for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/{,local/}bin/python3.12; do
            if is_312 "$p"; then
                python=$p
                break
            fi
        done
    fi
    if [ -z "$python" ]; then
        echo "compat: no Python 3.12 found ($COMPAT_PYTHON); set COMPAT_PYTHON" >&2
        exit 1
    fi
    echo "compat: creating $COMPAT_VENV with $python"
    "$python" -m venv "$COMPAT_VENV"
fi
if [ "$(cat "$COMPAT_VENV/.compat-pins" 2>/dev/null)" != "$COMPAT_PINS" ]; then
    echo "compat: installing $COMPAT_PINS (log: $COMPAT_VENV/pip.log)"
    # shellcheck disable=SC2086  # the pins are words
    "$PY" -m pip install $COMPAT_PINS >"$COMPAT_VENV/pip.log" 2>&1 || {
        tail -n 20 "$COMPAT_VENV/pip.log"
        exit 1
    }
    echo "$COMPAT_PINS" >"$COMPAT_VENV/.compat-pins"
fi
stack=$("$PY" -c "import sys, torch, triton, numpy
v = [sys.version.split()[0], torch.__version__, triton.__version__, numpy.__version__]
print('Python {}, torch {}, triton {}, numpy {}'.format(*v))")
echo "compat: $stack"

# 2. the tree at COMPAT_REV and its build (kept while the sources and the venv's torch are the same)
rev=$(git -C "$ROOT" rev-parse --verify "$COMPAT_REV^{commit}")
# The CPU-only build compiles csrc/*.cpp, csrc/schemas and csrc/cpu (with csrc/*.h), never csrc/cuda
# or csrc/emulation: a change there must not cost a rebuild (~45 min on 2 busy cores).
build_key="$(git -C "$ROOT" ls-tree "$rev" csrc/ setup.py | grep -v -e $'\tcsrc/cuda$' -e $'\tcsrc/emulation$' |
    cut -f1 | cut -d' ' -f3 | tr '\n' ' ')$stack"
keep=$(mktemp -d)
trap 'rm -rf "$keep"' EXIT
if [ "$(cat "$COMPAT_TREE/.compat-build" 2>/dev/null)" = "$build_key" ]; then
    cp -p "$COMPAT_TREE"/resfused/_C*.so "$COMPAT_TREE/resfused/_build_config.py" "$COMPAT_TREE/.compat-build" "$keep/"
fi
rm -rf "$COMPAT_TREE"
mkdir -p "$COMPAT_TREE"
git -C "$ROOT" archive "$rev" | tar -x -C "$COMPAT_TREE"
echo "compat: $COMPAT_TREE holds $(git -C "$ROOT" log -1 --format='%h %s' "$rev")"
if [ -f "$keep/.compat-build" ]; then
    cp -p "$keep"/_C*.so "$keep/_build_config.py" "$COMPAT_TREE/resfused/"
    cp -p "$keep/.compat-build" "$COMPAT_TREE/"
    echo "compat: the CPU sources and setup.py unchanged: the previous build of resfused._C is kept"
else
    echo "compat: building resfused._C (CPU kernels) against the venv's torch (log: $COMPAT_TREE/build.log)"
    (cd "$COMPAT_TREE" && RESFUSED_SKIP_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace) \
        >"$COMPAT_TREE/build.log" 2>&1 || {
        tail -n 40 "$COMPAT_TREE/build.log"
        echo "compat: build failed; full log: $COMPAT_TREE/build.log"
        exit 1
    }
    echo "$build_key" >"$COMPAT_TREE/.compat-build"
fi

# 3. the tests
cd "$COMPAT_TREE"
echo "compat: pytest -m \"$COMPAT_MARK\" $COMPAT_TESTS (TRITON_INTERPRET=1)"
# The filter hides triton 3.6's interpreter warning about numpy's int() of a 1-element array,
# given on every loop of every interpreted kernel (see step 1).
# shellcheck disable=SC2086  # the test paths are words
TRITON_INTERPRET=1 RESFUSED_REQUIRE_NATIVE=1 "$PY" -m pytest -q -p no:cacheprovider -m "$COMPAT_MARK" \
    -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" $COMPAT_TESTS
