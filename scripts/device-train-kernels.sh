#!/usr/bin/env bash
# One device call (docs/GPU.md): the PairGRPO step at Janus-Pro-1B shapes with the training kernels (fused AdamW,
# RMSNorm backward, SiLU · gate and softmax backwards) each turned off in turn, with the step's train time and the
# card's peak memory for each, so that their defaults rest on a measurement. From the repo root:
#
#     bash scripts/device-train-kernels.sh        carry: .dev/gpu-carry   (pairuni.xz from scripts/build-cuda.sh)
#
# SET=defaults runs the step as a user gets it instead (no switch named), then with two passes in flight and with
# micro-batches of 16: what the defaults were chosen over.
#
# Each run is `bench gpu-step` with the decode kernels on (as the step of device-bench.sh) and no probe; nvidia-smi
# samples the memory in use every 200 ms while it runs. One JSON line per run lands in $OUT/runs.jsonl and a
# table in $OUT/summary.txt. Testing without a GPU: BENCH_DEVICE=cpu BENCH_SHAPES=tiny CARRY_DIR=.dev/gpu-cpu.
set -uo pipefail

start=$(date +%s)
budget=${BUDGET_S:-200}
OUT=${OUT:-/tmp/pairuni-train-kernels}
mkdir -p "$OUT"
carry=${CARRY_DIR:-.dev/gpu-carry}
dev=${BENCH_DEVICE:-cuda}
shapes=${BENCH_SHAPES:-janus-pro-1b}
export RUST_BACKTRACE=1
left() { echo $((budget - ($(date +%s) - start))); }
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
[[ -n "$bin_plain" ]] || exit 1

if [[ ${SET:-kernels} == defaults ]]; then
    # The defaults as a user gets them (no switch named), and the two train-phase settings they were chosen over.
    decode=""
    runs=(
        "defaults|"
        "defaults, 2 passes in flight|--concurrent-passes 2"
        "defaults, micro-batches of 16|--micro-batch 16"
    )
else
    decode="--attention-kernel on --layer-kernels on --conv-kernel on --draw-kernel on"
    all_on="--fused-adamw on --norm-kernel on --backward-kernels on"
    runs=(
        "all on|$all_on"
        "all off|--fused-adamw off --norm-kernel off --backward-kernels off"
        "all off, one pass at a time|--fused-adamw off --norm-kernel off --backward-kernels off --concurrent-passes 1"
        "fused AdamW off|--fused-adamw off --norm-kernel on --backward-kernels on"
        "RMSNorm backward off|--fused-adamw on --norm-kernel off --backward-kernels on"
        "SiLU · gate and softmax backwards off|--fused-adamw on --norm-kernel on --backward-kernels off"
    )
fi
: >"$OUT/runs.jsonl"
for run in "${runs[@]}"; do
    label=${run%%|*}
    flags=${run#*|}
    t=$(( $(left) - 5 )); (( t > 60 )) && t=60
    (( t > 20 )) || { echo "out of time before: $label"; break; }
    # Scratch files stay outside $OUT: at most 8 files come back from a device call.
    mem=$(mktemp)
    run_json=$(mktemp)
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" 2>/dev/null &
        smi=$!
    else
        smi=
    fi
    echo "== $label (limit $t s)" | tee -a "$OUT/runs.log"
    # shellcheck disable=SC2086 # flag lists
    timeout "$t" "$bin_plain" --log info bench gpu-step --device "$dev" --shapes "$shapes" $decode $flags \
        --probe-steps 0 --compare-concurrent-passes --compare-pass-counts 1 --json \
        >"$run_json" 2>>"$OUT/runs.log"
    rc=$?
    [[ -n "$smi" ]] && kill "$smi" 2>/dev/null
    peak=$(sort -n "$mem" 2>/dev/null | tail -1)
    python3 - "$label" "$rc" "${peak:-}" "$run_json" >>"$OUT/runs.jsonl" <<'EOF'
import json, sys
label, rc, peak, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    d = json.loads(lines[-1]) if lines else {}
except (OSError, ValueError):
    d = {}
one = d.get("train_other") or {}
print(json.dumps({
    "run": label, "rc": rc, "peak_mem_mib": int(peak) if peak.isdigit() else None,
    "train": d.get("train"), "concurrent_passes": d.get("concurrent_passes"),
    "train_one_pass": one.get("train"), "split_one_pass": one.get("train_split"),
    "total": d.get("total"), "grad_norm": d.get("grad_norm"),
    "fused_adamw": d.get("fused_adamw"), "norm_kernel_status": d.get("norm_kernel_status"),
    "backward_kernels_status": d.get("backward_kernels_status"),
}))
EOF
    rm -f "$mem" "$run_json"
    (( rc != 0 )) && tail -n 3 "$OUT/runs.log"
done

python3 - "$OUT/runs.jsonl" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'run':<40}{'rc':>4}{'train ms':>10}{'passes':>8}{'1 pass ms':>11}{'step ms':>10}{'peak MiB':>10}")
for r in rows:
    f = lambda v: "-" if v is None else str(v)
    print(f"{r['run']:<40}{r['rc']:>4}{f(r['train']):>10}{f(r['concurrent_passes']):>8}{f(r['train_one_pass']):>11}"
          f"{f(r['total']):>10}{f(r['peak_mem_mib']):>10}")
for r in rows:
    s = r.get("split_one_pass")
    if s:
        print(f"split, {r['run']} (one pass):", "; ".join(f"{k} {v['host_ms']} host ms / {v['tensors']} tensors"
                                                          for k, v in s.items()))
EOF
echo "elapsed $(( $(date +%s) - start )) s"
