#!/usr/bin/env bash
# Where the device time of one PairGRPO step goes, kernel by kernel (docs/GPU.md). From the repo root on a lent
# GPU machine, carry .dev/gpu-carry:
#
#     bash scripts/device-profile.sh
#
#   (a) torch    the PyTorch eager image decode under torch.profiler: wall against GPU-kernel ms per step
#   (b) ncu A    Nsight Compute over `bench gpu-step --profile-phases decode_vq,train` (first LAUNCHES_A kernels)
#   (c) ncu B    the same over the image rollout's eager decode steps (first LAUNCHES_B kernels: prefill + steps)
# Each ncu run records only kernel durations (no replay, caches and clocks left alone). The raw CSVs come back
# gzipped with a summary of the heaviest kernels per phase.
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-/tmp/pairuni-device-profile}
mkdir -p "$OUT"
carry=${CARRY_DIR:-.dev/gpu-carry}
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
# Sets $bin and LD_LIBRARY_PATH.
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: ${ncu:-none}"

echo "== (a) pytorch decode profile"
timeout 90 python3 scripts/torch_step_bench.py --profile-decode 16 >"$OUT/torch_profile.json" 2>"$OUT/torch_profile.log"
echo "rc=$? $(cat "$OUT/torch_profile.json")"

profile() { # name, launch count, gpu-step flags...
    local name=$1 count=$2
    shift 2
    echo "== ($name) ncu, first $count kernels of: $*"
    timeout "${NCU_LIMIT_S:-150}" "$ncu" --profile-from-start off --launch-count "$count" --kill yes \
        --metrics gpu__time_duration.sum --clock-control none --cache-control none -f -o "/tmp/ncu_$name" \
        "$bin" --log info bench gpu-step --device cuda --probe-steps 0 --no-warmup --cuda-graphs off --json "$@" \
        >"$OUT/ncu_$name.log" 2>&1
    echo "rc=$? ($(( $(date +%s) - start )) s)"
    "$ncu" -i "/tmp/ncu_$name.ncu-rep" --csv --page raw >"/tmp/ncu_$name.csv" 2>>"$OUT/ncu_$name.log"
    gzip -c "/tmp/ncu_$name.csv" >"$OUT/ncu_$name.csv.gz"
}
# The hand-written kernels (off by default until measured) run as the bench step runs them; KERNELS=off profiles
# candle's ops alone.
if [[ "${KERNELS:-on}" == on ]]; then
    kernels_a=(--norm-kernel on --fused-adamw on)
    kernels_b=(--attention-kernel on --layer-kernels on)
else
    kernels_a=()
    kernels_b=()
fi
if [[ -n "$bin" && -n "$ncu" ]]; then
    profile A "${LAUNCHES_A:-6000}" --profile-phases decode_vq,train "${kernels_a[@]}"
    profile B "${LAUNCHES_B:-4500}" --profile-phases rollout_image "${kernels_b[@]}"
fi

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import csv, gzip, os, sys
out = sys.argv[1]
for name, phases in (("A", ["decode_vq", "train"]), ("B", ["rollout_image"])):
    path = os.path.join(out, f"ncu_{name}.csv.gz")
    try:
        rows = list(csv.reader(gzip.open(path, "rt")))
    except OSError as e:
        print(f"ncu {name}: no profile ({e})")
        continue
    if len(rows) < 3:
        print(f"ncu {name}: empty profile")
        continue
    head, units = rows[0], rows[1]
    k, t = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "ns": 1e-6, "us": 1e-3, "ms": 1.0}.get(units[t], 1e-6)
    kernels = [(r[k], float(r[t].replace(",", "")) * scale) for r in rows[2:] if len(r) > t and r[t]]
    # Split at the marker kernel each profiled phase opens with.
    parts, cur = [], None
    for kname, ms in kernels:
        if "usqrt_f64" in kname:
            cur = []
            parts.append(cur)
        elif cur is not None:
            cur.append((kname, ms))
    for ph, ks in zip(phases, parts):
        total = sum(ms for _, ms in ks)
        print(f"ncu {name} {ph}: {len(ks)} kernels, {total:.2f} ms of kernel time")
        agg = {}
        for kname, ms in ks:
            short = kname.split("(")[0][:70]
            c, s = agg.get(short, (0, 0.0))
            agg[short] = (c + 1, s + ms)
        for short, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"    {s:10.3f} ms {100 * s / max(total, 1e-9):5.1f}% {c:6d}x  {short}")
PY
echo "elapsed $(( $(date +%s) - start )) s"
