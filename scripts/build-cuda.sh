#!/usr/bin/env bash
# Builds the release `pairuni` binary with the `cuda` feature on a machine WITHOUT a GPU or CUDA toolkit
# (recipe: docs/GPU.md and the team's CUDA.md). Nothing third-party is committed: nvcc comes from pinned PyPI
# wheels in a git-ignored venv, and candle-core is patched (scripts/patch-candle.sh) to load the CUDA libraries at
# run time and to start gradients from their first contribution, through a `[patch.crates-io]` given on the
# command line.
#
# Usage: scripts/build-cuda.sh            (from anywhere; builds from a snapshot of the repo)
# Env:   CARGO_TARGET_DIR  build folder            (default /work/targets/cuda, else <repo>/target-cuda)
#        CUDA_VENV         venv holding nvcc       (default <repo>/.cuda/venv)
#        OUT_DIR_BIN       where the binary lands  (default <repo>/.dev/gpu)
#        CARRY_DIR         the device call's carry folder, holding only pairuni.xz (default <repo>/.dev/gpu-carry)
#        NICE              nice level for cargo    (default 19: the build takes 12-20 min on 2 cores)
#        VARIANTS          what to build           (default "plain cudnn": pairuni.xz, and pairuni-cudnn.xz whose
#                                                    convolutions go through cuDNN, which the device scripts try
#                                                    first until a GPU run has measured it)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${CARGO_TARGET_DIR:-}" ]]; then
    if [[ -d /work/targets ]]; then CARGO_TARGET_DIR=/work/targets/cuda; else CARGO_TARGET_DIR="$repo/target-cuda"; fi
fi
export CARGO_TARGET_DIR
venv="${CUDA_VENV:-$repo/.cuda/venv}"
out_dir="${OUT_DIR_BIN:-$repo/.dev/gpu}"
carry_dir="${CARRY_DIR:-$repo/.dev/gpu-carry}"
nice_level="${NICE:-19}"
mkdir -p "$CARGO_TARGET_DIR" "$out_dir"

# 1. nvcc 13.0 from PyPI. A newer nvcc emits PTX that the 13.0 driver on the GPU machine cannot load.
if [[ ! -x "$venv/bin/pip" ]]; then
    python3 -m venv "$venv"
fi
cu13="$(ls -d "$venv"/lib/python3.*/site-packages/nvidia/cu13 2>/dev/null | head -1 || true)"
# NVRTC too: it compiles the binary's hand-written kernels at run time, and each build compiles them here once
# (no GPU is needed for that).
if [[ -z "$cu13" || ! -x "$cu13/bin/nvcc" || ! -e "$cu13/lib/libnvrtc.so.13" ]]; then
    "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-nvrtc==13.0.88
    cu13="$(ls -d "$venv"/lib/python3.*/site-packages/nvidia/cu13 | head -1)"
fi
export CUDA_HOME="$cu13" CUDA_PATH="$cu13" CUDA_ROOT="$cu13"
export PATH="$CUDA_HOME/bin:$PATH"
# No GPU to probe here; the lent machines are Hopper (H100/H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2

# 2. A private copy of candle-core (scripts/patch-candle.sh): cudarc switched from `dynamic-linking` to
#    `dynamic-loading` (libcuda, cublas, curand, nvrtc are dlopen'ed at run time, so the binary starts on machines
#    without them and finds them by soname on the GPU machine; cudarc refuses both features at once), and the
#    backward pass's gradients started from their first contribution instead of from zeros (about a quarter of the
#    train phase's backward ops; PAIRUNI_GRAD_ACCUMULATE=zeros at run time restores candle's accumulation).
patched="$("$repo/scripts/patch-candle.sh" "$CARGO_TARGET_DIR/patched" cuda grad | tail -1)"

# 3. Static cudart: candle-kernels asks the linker for `cudart`, and the wheel has only libcudart.so.13 and
#    libcudart_static.a. A linker script named libcudart.so that pulls in the static archive satisfies `-lcudart`.
linkdir="$CARGO_TARGET_DIR/cudart-static"
mkdir -p "$linkdir"
echo "INPUT($CUDA_HOME/lib/libcudart_static.a)" >"$linkdir/libcudart.so"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$linkdir"

# 4. Build from a snapshot of the repo: the command-line patch rewrites Cargo.lock, which must not touch the
#    committed one, and a snapshot also keeps other people's half-saved edits from changing mid-build.
ws="$CARGO_TARGET_DIR/workspace"
mkdir -p "$ws"
# Sync file by file: an unchanged file keeps the snapshot's copy and its time stamp, so the rebuild stays
# incremental; a changed one is written anew and stamped now. (Copying the repo's own time stamps, as tar does,
# let a file edited while a build ran keep a time older than that build's artifacts, and cargo then took the
# stale artifact for current.) Only what git tracks or would track is copied; what the repo no longer has goes.
listed="$ws/.snapshot-files"
(cd "$repo" && git ls-files --cached --others --exclude-standard) | sort >"$listed.new"
while IFS= read -r f; do
    [[ -f "$repo/$f" ]] || continue
    if ! cmp -s "$repo/$f" "$ws/$f"; then
        mkdir -p "$(dirname "$ws/$f")"
        cp "$repo/$f" "$ws/$f"
    fi
done <"$listed.new"
if [[ -f "$listed" ]]; then
    comm -23 "$listed" "$listed.new" | while IFS= read -r f; do rm -f "$ws/$f"; done
fi
mv "$listed.new" "$listed"
cd "$ws"
build_variant() { # features, carried file name
    local features=$1 name=$2
    nice -n "$nice_level" cargo build --release -p pairuni --features "$features" \
        --config "patch.crates-io.candle-core.path=\"$patched\""
    local bin="$CARGO_TARGET_DIR/release/pairuni"
    mkdir -p "$out_dir"
    cp "$bin" "$out_dir/$name.tmp"
    strip "$out_dir/$name.tmp"
    mv "$out_dir/$name.tmp" "$out_dir/$name"
    # The kernels NVRTC compiles at their first use, compiled now through the binary's own loader (cudarc finds
    # libnvrtc.so.13 as it will on the GPU machine): a kernel that does not compile fails the build before the
    # carry folder gets the binary.
    LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$out_dir/$name" bench gpu-kernels
    # The device call carries at most 64 MiB in all: ship the binary xz-compressed (the PTX inside packs well).
    mkdir -p "$carry_dir"
    xz -T2 -9 -c "$out_dir/$name" >"$carry_dir/$name.xz.tmp"
    mv "$carry_dir/$name.xz.tmp" "$carry_dir/$name.xz"
    if ldd "$out_dir/$name" | grep -Eq 'libcuda|libcudart|libcublas|libcurand|libnvrtc|libcudnn'; then
        echo "error: the binary links a CUDA library dynamically:" >&2
        ldd "$out_dir/$name" >&2
        exit 1
    fi
    echo "stripped binary: $out_dir/$name ($(du -m "$out_dir/$name" | cut -f1) MiB)"
    echo "compressed:      $carry_dir/$name.xz ($(du -m "$carry_dir/$name.xz" | cut -f1) MiB) <- carry $carry_dir"
}
# cuDNN is loaded at run time like the rest, so a machine without it fails only at the first convolution; the
# plain build is the default and what the device scripts fall back to then.
for variant in ${VARIANTS:-plain cudnn}; do
    case $variant in
        plain) build_variant cuda pairuni ;;
        cudnn) build_variant cuda,cudnn pairuni-cudnn ;;
        *) echo "unknown variant $variant (cudnn | plain)" >&2; exit 1 ;;
    esac
done
