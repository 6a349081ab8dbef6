#!/usr/bin/env bash
# The GPU benchmark as one command (see bench/gpu.py).
#
#   bench/gpu.sh --prepare   here (with a registry): download the wheels the GPU machine lacks
#                            into bench/wheels/ (ignored; it travels with the working tree)
#   bench/gpu.sh             there (no registry): install them with --no-index into a temp
#                            target, run bench/gpu.py under a time limit, JSON to $OUT if set
#
# Environment: GPU_BENCH_ARGS (extra bench/gpu.py arguments, e.g. "--device cpu --quick" for a
# CPU rehearsal), GPU_BENCH_SCRIPT (default bench/gpu.py), GPU_BENCH_TIMEOUT (seconds,
# default 470), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
wheels="$here/wheels"
py="${PYTHON:-python3}"

# What streamv2v (and the daemon's data plane) imports that the GPU machine (Python 3.12,
# torch, transformers, accelerate, peft, safetensors, numpy, opencv, pillow) does not have.
# Versions: those of the tested environment (pydantic-core must match pydantic exactly).
BINARY=(pydantic-core==2.50.4 kornia_rs==0.2.0 ai-edge-litert==2.3.0 ml_dtypes==0.7.0
        protobuf==7.36.2)
PURE=(diffusers==0.42.1 kornia==0.9.0 pydantic==2.14.3 annotated-types==0.8.0
      typing-inspection==0.4.5 platformdirs==4.14.5 tqdm==4.70.1 importlib-metadata==10.2.0
      zipp==4.1.2 flatbuffers==25.12.19 backports.strenum==1.2.8)
# (typing-extensions is not carried: torch brings it, and a copy first on the path would shadow it)

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$wheels"
    common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$wheels")
    "$py" -m pip download "${common[@]}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 "${BINARY[@]}"
    "$py" -m pip download "${common[@]}" --platform any "${PURE[@]}"
    du -sh "$wheels"
    ls "$wheels"
    exit 0
fi

target="$(mktemp -d "${TMPDIR:-/tmp}/streamv2v-wheels.XXXXXX")"
trap 'rm -rf "$target"' EXIT
ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$ver" == "3.12" ]]; then
    ls "$wheels"/*.whl >/dev/null  # (fails with a clear glob error when --prepare was not run)
    "$py" -m pip install --quiet --no-index --no-deps --target "$target" "$wheels"/*.whl
    export PYTHONPATH="$root:$target${PYTHONPATH:+:$PYTHONPATH}"
else
    # A rehearsal on another Python: the wheels are for 3.12; use this environment's packages.
    echo "python $ver is not 3.12: skipping the wheel install (rehearsal)" >&2
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
out_dir="${OUT:-$root}"
mkdir -p "$out_dir"
export BENCH_JSON="$out_dir/bench_gpu.json"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The compile cache in $OUT's sibling would be lost anyway: keep it in the temp target.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$target/inductor}"
cd "$root"
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of words
timeout --kill-after=10 "${GPU_BENCH_TIMEOUT:-470}" "$py" "${GPU_BENCH_SCRIPT:-bench/gpu.py}" \
    ${GPU_BENCH_ARGS:-} \
    2>&1 | tee "$out_dir/bench_gpu.log"
