# Sourced by the device scripts (device-bench.sh, device-profile.sh) with $carry set: unpacks the CUDA binaries
# and points the loader at the CUDA libraries. Sets $bin (the cuDNN build when carried, else the plain one) and
# $bin_plain (the plain build: the fallback should cuDNN fail to load); empty if nothing is carried.
# shellcheck shell=bash

# The binaries travel xz-compressed (the call carries at most 64 MiB).
unpack() { # carried name -> prints the path of a runnable binary, or nothing
    local name=$1 out=/tmp/$1-cuda
    if [[ -x "$carry/$name" ]]; then
        echo "$carry/$name"
    elif [[ -f "$carry/$name.xz" ]]; then
        if command -v xz >/dev/null; then
            xz -dc "$carry/$name.xz" >"$out"
        else
            python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
                "$carry/$name.xz" "$out"
        fi
        chmod +x "$out"
        echo "$out"
    fi
}
bin_plain=$(unpack pairuni)
bin=$(unpack pairuni-cudnn)
[[ -z "$bin" ]] && bin=$bin_plain
[[ -z "$bin_plain" ]] && bin_plain=$bin
[[ -z "$bin" ]] && echo "no binary: expected $carry/pairuni.xz (build it with scripts/build-cuda.sh, carry $carry)" >&2

# candle dlopens cuBLAS, cuRAND, NVRTC and cuDNN at run time: point the loader at the CUDA toolkit and at the
# copies PyTorch's pip wheels bring, in case neither is on the default library path.
pylibs=$(python3 -c 'import glob, os, sys; print(":".join(sorted({d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "lib"))})))' 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${pylibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
