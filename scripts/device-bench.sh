#!/usr/bin/env bash
# The ONE command for a lent GPU machine (docs/GPU.md). From the repo root:
#
#     bash scripts/device-bench.sh            carry: .dev/gpu-carry   (pairuni.xz from scripts/build-cuda.sh)
#
# Runs, each under its own time limit so the whole stays under BUDGET_S (default 470 s):
#   env.txt      the card, the libraries, and pairuni bench gpu-kernels (NVRTC compiles the hand-written kernels)
#   (a) parity   pairuni bench gpu-parity: the committed Janus fixtures on cuda in f32 and bf16 vs reference
#   (b) pytorch  scripts/torch_step_bench.py: one PairGRPO step, transformers eager, same card
#   (c) candle   pairuni bench gpu-step: the same step through pairuni's library (with CUDA graphs if its
#                graph check passes), then its image and answer rollouts once more the other way (--compare-graphs),
#                and its answers with and without prompt sharing (--compare-sharing)
#   (d) smoke    the toy pipeline's commands (world, pairs, sft, train, eval) on the device, two steps each
# and prints a table with the ratio. Logs and JSON land in $OUT (at most 8 files come back from the device).
# Testing without a GPU: BENCH_DEVICE=cpu BENCH_SHAPES=tiny CARRY_DIR=.dev/gpu-cpu bash scripts/device-bench.sh
set -uo pipefail

start=$(date +%s)
budget=${BUDGET_S:-470}
OUT=${OUT:-/tmp/pairuni-device-bench}
mkdir -p "$OUT"
carry=${CARRY_DIR:-.dev/gpu-carry}
dev=${BENCH_DEVICE:-cuda}
shapes=${BENCH_SHAPES:-janus-pro-1b}
torch_args=(--device "$dev")
[[ "$shapes" == tiny ]] && torch_args+=(--tiny)
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1

left() { echo $((budget - ($(date +%s) - start))); }

# Sets $bin (cuDNN convolutions), $bin_plain (without: the fallback) and LD_LIBRARY_PATH.
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1
    [[ -n "$bin" ]] && "$bin" --version 2>&1
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldconfig -p 2>/dev/null | grep -E 'libcublas|libnvrtc|libcurand|libcuda\.' | head -8
    # NVRTC compiles the hand-written kernels at their first use; a failure here names the module and the
    # compiler's message before any part of the call depends on them (their checks then fall back to candle).
    [[ -n "$bin" ]] && timeout 60 "$bin" bench gpu-kernels 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# (a) parity: small checkpoint, seconds.
if [[ -n "$bin" ]]; then
    echo "== (a) parity (limit 60 s)"
    timeout 60 "$bin" bench gpu-parity --device "$dev" --json >"$OUT/parity.json" 2>"$OUT/parity.log"
    rc=$?
    echo "rc=$rc $(tail -c 2000 "$OUT/parity.json")"
    if (( rc != 0 )); then
        # The first run's JSON goes to the log (it names the rows and kernels that failed); the retry runs
        # candle's ops alone, on the binary without cuDNN.
        { echo "==== first run's result (rc=$rc)"; cat "$OUT/parity.json"; } >>"$OUT/parity.log"
        echo "== (a') parity again without cuDNN and the hand-written decode kernels"
        echo "==== without cuDNN and the hand-written decode kernels" >>"$OUT/parity.log"
        PAIRUNI_ATTENTION_KERNEL=off PAIRUNI_LAYER_KERNELS=off PAIRUNI_CONV_KERNEL=off timeout 60 "$bin_plain" bench gpu-parity \
            --device "$dev" --json >"$OUT/parity.json" 2>>"$OUT/parity.log"
        echo "rc=$? $(tail -c 2000 "$OUT/parity.json")"
    fi
fi

# (b) PyTorch baseline: ≈ 75 s on an H200 (model init, a full-length warm-up step, the timed step); the candle
# step after it needs about a minute.
t=$(( $(left) - 90 )); (( t > 150 )) && t=150
echo "== (b) pytorch step (limit ${t} s)"
timeout "$t" "${PYTHON:-python3}" scripts/torch_step_bench.py "${torch_args[@]}" >"$OUT/torch_step.json" 2>"$OUT/torch_step.log"
echo "rc=$? $(cat "$OUT/torch_step.json")"

# (c) candle: whatever time is left; phase start/done lines in the log show how far it got if it is cut.
if [[ -n "$bin" ]]; then
    t=$(( $(left) - 10 ))
    echo "== (c) candle step (limit ${t} s)"
    # The graph check decides whether the step runs with CUDA graphs; --compare-graphs times the image and answer
    # rollouts once more with the other setting (rollout_image_other in the JSON); --compare-sharing times the
    # answer rollout and the answers' teacher-forced pass with prompt sharing on and off (prompt_sharing_compare).
    # The attention kernel is off by default until measured: the step turns it on, and --compare-attention-kernel
    # times the rollouts once more without it. The train phase runs two passes at once (auto on a GPU);
    # --compare-concurrent-passes runs it again from one thread, with its split, and from four (train_others;
    # the bench's step has four passes, so four threads run them all at once). The fused AdamW
    # kernel and the RMSNorm backward kernel are off by default until measured: the step turns them on
    # (`fused_adamw` and `norm_kernel_status` say whether their checks passed). So are the layer kernels (residual
    # add + RMSNorm, SiLU · gate, rotary + cache write): the step turns them on and --compare-layer-kernels times
    # the rollouts without. --compare-micro-batches 16 runs the train phase once more with 16 rollouts per pass
    # (half the passes: on a host-bound device, about half the ops). The VQ's convolution kernel (im2col with the
    # weight's row order, then one batched matmul) is off by default until measured: the step turns it on and
    # --compare-conv-kernel times the VQ decode without it (conv_kernel_compare). The draw kernel (CFG mix or
    # bias, Gumbel noise from a counter, argmax and log-prob in one launch; no noise drawn between the graphs) is
    # off by default until measured: the step turns it on and --compare-draw-kernel times the rollouts without it.
    # So are the backward kernels (SiLU · gate and the attention's softmax in the train phase): the step turns them
    # on (`backward_kernels_status`; the train split shows their effect). --compare-top-p 0.9 times the rollouts
    # once more with a top-p nucleus, which the draw kernel finds by bisection (top_p_compare: its cost).
    timeout "$t" "$bin" --log info bench gpu-step --device "$dev" --shapes "$shapes" --compare-graphs \
        --compare-sharing --attention-kernel on --compare-attention-kernel --compare-concurrent-passes \
        --fused-adamw on --norm-kernel on --layer-kernels on --compare-layer-kernels --compare-micro-batches 16 \
        --conv-kernel on --compare-conv-kernel --draw-kernel on --compare-draw-kernel --compare-top-p 0.9 \
        --backward-kernels on --json \
        >"$OUT/candle_step.json" 2>"$OUT/candle_step.log"
    rc=$?
    echo "rc=$rc $(cat "$OUT/candle_step.json")"
    (( rc != 0 )) && tail -n 20 "$OUT/candle_step.log"
    # The toy pipeline below runs the binary that last completed the step.
    if (( rc != 0 && rc != 124 && rc != 137 )); then
        smoke_bin=$bin_plain
        export PAIRUNI_ATTENTION_KERNEL=off PAIRUNI_GRAD_ACCUMULATE=zeros
    fi
    # A failure that is not a timeout (cuDNN, a hand-written kernel, concurrent train passes, the training ops,
    # the stacked projections, a fused kernel, a device-side draw, prompt sharing or an op without a bf16 CUDA
    # kernel, say): retry with the binary without cuDNN, dropping the pieces newest first, each retry keeping the
    # previous one's flags: the layer, convolution, draw and backward kernels, then the other hand-written kernels and concurrent passes, then the
    # training ops (and the patched gradient accumulation, scripts/patch-candle.sh), then the stacked
    # projections, then the fused sampling kernels and prompt sharing (answers drawn on the host), then images
    # drawn on the host in f32; so that the call still brings back a candle number (the log keeps the first
    # error). Same files (at most 8 come back); the JSON's cudnn, dtype, concurrent_passes, fused_training,
    # stack_projections, fused_sampling, prompt_sharing and *_sampler say which ran.
    # (A retry names each of these switches once: the command line takes a switch once.)
    all_on="--attention-kernel on --fused-adamw on --norm-kernel on --layer-kernels on --conv-kernel on --draw-kernel on --backward-kernels on"
    off0="--attention-kernel on --fused-adamw on --norm-kernel on --layer-kernels off --conv-kernel off --draw-kernel off --backward-kernels off"
    # Without the training kernels the step at micro-batches of 8 ran out of an H200's memory (eighteenth session,
    # docs/BENCHMARKS.md), so the retries that turn them off take micro-batches of 4 (not measured).
    off1="--attention-kernel off --fused-adamw off --norm-kernel off --layer-kernels off --conv-kernel off --draw-kernel off --backward-kernels off --concurrent-passes 1 --micro-batch 4"
    off2="$off1 --fused-training off"
    off3="$off2 --stack-projections off"
    off4="$off3 --fused-sampling off --prompt-sharing off --text-sampler host"
    off5="$off4 --image-sampler host --dtype f32"
    ladder=("$off0" "$off1" "$off2" "$off3" "$off4" "$off5")
    # An error that names cuDNN is the cuDNN binary's own: the first retry then runs the plain binary with every
    # piece on, so that a cuDNN failure alone costs none of the other measurements.
    if (( rc != 0 && rc != 124 && rc != 137 )) && grep -qi cudnn "$OUT/candle_step.log"; then
        ladder=("$all_on" "${ladder[@]}")
    fi
    for retry in "${ladder[@]}"; do
        t=$(( $(left) - 10 ))
        (( rc != 0 && rc != 124 && rc != 137 && t > 90 )) || break
        echo "== (c') candle step again without cuDNN ${retry:+and with $retry }(limit ${t} s)"
        echo "==== retry without cuDNN ${retry:+and with $retry}" >>"$OUT/candle_step.log"
        grad_env=PAIRUNI_GRAD_ACCUMULATE=first
        [[ $retry == *"--fused-training off"* ]] && grad_env=PAIRUNI_GRAD_ACCUMULATE=zeros
        echo "==== ($grad_env)" >>"$OUT/candle_step.log"
        # shellcheck disable=SC2086 # $retry is a list of flags
        timeout "$t" env "$grad_env" "$bin_plain" --log info bench gpu-step --device "$dev" --shapes "$shapes" $retry --no-warmup --json \
            >"$OUT/candle_step.json" 2>>"$OUT/candle_step.log"
        rc=$?
        echo "rc=$rc $(cat "$OUT/candle_step.json")"
    done
fi

# (d) the toy pipeline's own commands on the device (bf16 there): world, pairs, sft, train, eval, two steps each.
# The step benchmark calls the library; this runs the trainers, checkpoints and samplers a user runs. Its
# lines go to candle_step.log (at most 8 files come back) and one `smoke:` line to the summary.
if [[ -n "$bin" ]] && (( $(left) > 60 )); then
    t=$(( $(left) - 15 )); (( t > 120 )) && t=120
    echo "== (d) toy pipeline on $dev (limit ${t} s)"
    smoke=$(mktemp -d)
    cp configs/tiny-run.toml "$smoke/c.toml"
    if [[ -n "${smoke_bin:-}" ]]; then
        # The step failed on the full binary: the smoke runs the trainers the conservative way too (one pass at a
        # time, the composed training ops), so that it still says whether the pipeline's commands work.
        sed -i -e 's/^\[sft\]$/[sft]\nconcurrent_passes = 1/' -e 's/^\[train\]$/[train]\nconcurrent_passes = 1/' "$smoke/c.toml"
        printf '\n[model]\nfused_training = "off"\n' >>"$smoke/c.toml"
    fi
    smoke_start=$(date +%s)
    abs_bin=$(readlink -f "${smoke_bin:-$bin}")
    (
        cd "$smoke" &&
            "$abs_bin" --log warn world generate --out w --understanding 60 --generation 60 --bench 12 &&
            "$abs_bin" --log warn pairs build --understanding w/understanding.jsonl --generation w/generation.jsonl --out p/pairs.jsonl &&
            "$abs_bin" --log warn sft --config c.toml --out sft --device "$dev" --quiet &&
            "$abs_bin" --log warn train --config c.toml --out train --device "$dev" --quiet &&
            "$abs_bin" --log warn eval --config c.toml --model train/final --bench w/bench --out e --device "$dev"
    ) >"$smoke/out.log" 2>&1 &
    pid=$!
    # The watchdog's output goes nowhere: its `sleep` outlives the `kill` below, and holding the caller's stdout
    # open it kept `device-bench.sh | tee` waiting for the full limit (the first lent call lost 117 s so).
    ( sleep "$t"; kill "$pid" 2>/dev/null ) >/dev/null 2>&1 & watchdog=$!
    wait "$pid"; rc=$?
    kill "$watchdog" 2>/dev/null
    { echo "==== (d) toy pipeline on $dev"; cat "$smoke/out.log"; } >>"$OUT/candle_step.log"
    echo "smoke: toy world -> pairs -> sft -> train -> eval on $dev: rc=$rc in $(( $(date +%s) - smoke_start )) s" \
        | tee -a "$OUT/candle_step.log"
    (( rc != 0 )) && tail -n 15 "$smoke/out.log"
fi

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

pt, cd, par = load("torch_step.json"), load("candle_step.json"), load("parity.json")
print("device:", (pt or cd or {}).get("device", "?"))
if par is not None:
    print(f"parity on {par.get('device')}: {'PASS' if par.get('pass') else 'FAIL'}  (max|d|/max|ref| vs transformers f64; vs cpu f32)")
    for c in par.get("checks", []):
        print(f"  {c['tensor']:<50}{c['dtype']:>6}{c['rel_err_vs_reference']:>11.2e}{c['rel_err_vs_cpu_f32']:>11.2e}"
              f"  tol {c['tolerance']:.0e} {'ok' if c['pass'] else 'FAIL'}")
    if par.get("kernels"):
        # The hand-written decode kernels in the rows that name them: their first-call checks ran there.
        print("  parity kernels:", json.dumps(par["kernels"]))
else:
    print("parity: no result (see parity.log)")
keys = ["rollout_image", "rollout_text", "decode_vq", "train", "total", "ms_per_image_step"]
print(f"{'phase (ms)':<26}{'pytorch':>12}{'candle':>12}{'pytorch/candle':>16}")
for k in keys:
    a = (pt or {}).get(k)
    b = (cd or {}).get(k)
    r = f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else "-"
    prec = 3 if k == "ms_per_image_step" else 1  # the per-step target is 3 ms
    fa = f"{a:.{prec}f}" if isinstance(a, (int, float)) else "-"
    fb = f"{b:.{prec}f}" if isinstance(b, (int, float)) else "-"
    print(f"{k:<26}{fa:>12}{fb:>12}{r:>16}")
other = (cd or {}).get("rollout_image_other")
if other:
    label = "graphs" if other.get("cuda_graphs") else "no graphs"
    for k, err in (("rollout_image", "error"), ("rollout_text", "text_error")):
        if err in other:
            print(f"candle {k} with {label}: failed: {other[err]}")
    for k in ("rollout_image", "ms_per_image_step", "rollout_text"):
        a, b = (pt or {}).get(k), other.get(k)
        if not isinstance(b, (int, float)):
            continue
        r = f"{a / b:.2f}x" if isinstance(a, (int, float)) and b > 0 else "-"
        prec = 3 if k == "ms_per_image_step" else 1
        fa = f"{a:.{prec}f}" if isinstance(a, (int, float)) else "-"
        print(f"{k + ' (' + label + ')':<26}{fa:>12}{b:>12.{prec}f}{r:>16}")
    # The same step with these rollouts in place of the step's own ones (the other phases do not change).
    t = (cd or {}).get("total")
    swaps = [((cd or {}).get(k), other.get(k)) for k in ("rollout_image", "rollout_text")]
    swaps = [(x, y) for x, y in swaps if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if isinstance(t, (int, float)) and swaps:
        a = (pt or {}).get("total")
        tt = t + sum(y - x for x, y in swaps)
        ratio = f"{a / tt:.2f}x" if isinstance(a, (int, float)) and tt > 0 else "-"
        fa = f"{a:.1f}" if isinstance(a, (int, float)) else "-"
        print(f"{'total (' + label + ')':<26}{fa:>12}{tt:>12.1f}{ratio:>16}")
    print("graph report:", json.dumps(other.get("graph_report")), "answers:", json.dumps(other.get("answer_graph_report")))
warm = (pt or {}).get("warmup_step") or {}
if warm.get("total"):
    # The warm-up step ran at full length: the same step cold, with PyTorch's first-time work per shape in it.
    print(f"pytorch first (warm-up) step, cold: total {warm['total']:.1f} ms, rollout_image {warm.get('rollout_image', 0):.1f} ms"
          f" ({warm.get('rollout_image', 0) / max((pt or {}).get('image_tokens') or 1, 1):.3f} ms per image step)")
gap = (cd or {}).get("logprob_gap")
if gap:
    # Sampling-time against teacher-forced log-probs of the step's own tokens: rounding only on a sound path.
    print("log-prob gap, sampled vs teacher-forced (mean / max nats):",
          "; ".join(f"{k} {v['mean']:.2e} / {v['max']:.2e} over {v['tokens']} tokens" for k, v in gap.items()))
ps = (cd or {}).get("prompt_sharing_compare")
if ps:
    # The same answers' work, each GRPO group's prompt run once (on) or once per rollout (off, as PyTorch does).
    print(f"prompt sharing (the step ran with it {'on' if cd.get('prompt_sharing') else 'off'}): "
          + "; ".join(f"{k}: " + (f"rollout_text {v['rollout_text']} ms, score_text {v['score_text']} ms"
                                   if "error" not in v else f"failed: {v['error']}") for k, v in ps.items()))
for key, switch, label in (("attention_kernel_compare", "attention_kernel", "the attention kernel"),
                           ("layer_kernels_compare", "layer_kernels", "the layer kernels"),
                           ("draw_kernel_compare", "draw_kernel", "the draw kernel")):
    # The same rollouts with one set of hand-written decode kernels the other way (graphs as in the step).
    c = (cd or {}).get(key)
    if c:
        side = "on" if c.get(switch) else "off"
        print(f"rollouts with {label} {side}: " + (f"failed: {c['error']}" if "error" in c else
              f"rollout_image {c.get('rollout_image')} ms ({c.get('ms_per_image_step')} ms per image step), "
              f"rollout_text {c.get('rollout_text')} ms, image graphs captured "
              f"{(c.get('graph_report') or {}).get('captured', '-')}"))
tp = (cd or {}).get("top_p_compare")
if tp:
    # The same rollouts keeping to a top-p nucleus (the draw kernel's bisection, or host draws without it).
    print(f"rollouts at top-p {tp.get('top_p')}: " + (f"failed: {tp['error']}" if "error" in tp else
          f"rollout_image {tp.get('rollout_image')} ms ({tp.get('ms_per_image_step')} ms per image step), "
          f"rollout_text {tp.get('rollout_text')} ms, image graphs captured "
          f"{(tp.get('graph_report') or {}).get('captured', '-')}; draw kernel {(cd or {}).get('draw_kernel_report')}"))
cc = (cd or {}).get("conv_kernel_compare")
if cc:
    # The VQ decode of as many images with the convolution kernel the other way (im2col + matmul of candle, or
    # cuDNN in the cuDNN build).
    side = "on" if cc.get("conv_kernel") else "off"
    print(f"decode_vq with the conv kernel {'on' if (cd or {}).get('conv_kernel') else 'off'}: "
          f"{(cd or {}).get('decode_vq')} ms; {side}: "
          + (f"failed: {cc['error']}" if "error" in cc else f"{cc.get('decode_vq')} ms"))
others = (cd or {}).get("train_others") or ([cd["train_other"]] if (cd or {}).get("train_other") else [])
if others:
    # The train phase on the same rollouts with other numbers of passes in flight (each its own optimiser step).
    print(f"candle train with {(cd or {}).get('concurrent_passes')} passes in flight: {(cd or {}).get('train')} ms; "
          + "; ".join(f"with {o.get('concurrent_passes')}: {o.get('train')} ms" for o in others))
mbs = (cd or {}).get("train_micro_batches") or []
if mbs:
    # The train phase on the same rollouts with more rollouts per pass (each its own optimiser step).
    print(f"candle train with micro-batches of {(cd or {}).get('micro_batch', 8)}: {(cd or {}).get('train')} ms; "
          + "; ".join(f"of {m.get('micro_batch')}: {m.get('train')} ms" for m in mbs))
ts = (cd or {}).get("train_split") or next((o["train_split"] for o in others if o.get("train_split")), None)
if ts:
    # Host milliseconds and tensors created (about one kernel each) per part of candle's train phase from one
    # thread: a sum near its time says the phase is bound by candle's per-op host cost, a sum well below it says
    # by the device.
    print("candle train split (one thread):",
          "; ".join(f"{k} {v['host_ms']} host ms / {v['tensors']} tensors" for k, v in ts.items()))
pm = (cd or {}).get("pool_memory")
if pm or (pt or {}).get("peak_mem_gib") is not None:
    # Live tensors at their peak on both sides (PyTorch's max_memory_allocated, the pool's used high-water mark),
    # and what candle's pool held from the card, freed memory it keeps included (what nvidia-smi shows).
    print(f"memory (GiB): pytorch max allocated {(pt or {}).get('peak_mem_gib', '-')}; candle pool used high "
          f"{(pm or {}).get('used_high_gib', '-')}, reserved high {(pm or {}).get('reserved_high_gib', '-')}")
gc = (cd or {}).get("graph_check")
if gc:
    print("graph check (captured vs eager static steps, same seed):", json.dumps(gc),
          "-> the step ran with graphs" if (cd or {}).get("cuda_graphs") else "-> the step ran eagerly")
try:
    with open(os.path.join(out, "candle_step.log")) as f:
        for line in f:
            if line.startswith("smoke:"):
                print(line.rstrip())
except OSError:
    pass
for name, d in (("pytorch", pt), ("candle", cd)):
    if d:
        extra = {k: d.get(k) for k in ("dtype", "image_tokens", "answer_tokens", "grad_norm", "params_with_grad",
                                       "init_ms", "peak_mem_gib", "pool_memory", "cudnn", "image_sampler", "text_sampler", "fused_sampling", "stack_projections", "attention_kernel", "attention_kernel_report", "fused_training", "prompt_sharing", "concurrent_passes", "pool_keeps_memory", "grad_accumulation", "fused_adamw", "fused_adamw_report", "norm_kernel", "norm_kernel_report", "layer_kernels", "layer_kernels_status", "conv_kernel", "conv_kernel_report", "draw_kernel", "draw_kernel_report", "backward_kernels", "backward_kernels_status",
                                       "cuda_graphs", "graph_report", "answer_graph_report", "image_step_probe") if k in d}
        print(name, json.dumps(extra))
    else:
        print(name, "did not finish: see its log")
# Issue 9's three conditions, read off the numbers above (the PyTorch step is the warm, timed one; the cold
# warm-up step is shown beside it).
print(f"issue 9 targets, on {(cd or pt or {}).get('device', '?')}:")
print("  parity within bf16 tolerance:", "no result" if par is None else ("met" if par.get("pass") else "NOT met"))
pt_total, cd_total = (pt or {}).get("total"), (cd or {}).get("total")
if isinstance(pt_total, (int, float)) and isinstance(cd_total, (int, float)) and cd_total > 0:
    ratio = pt_total / cd_total
    cold = ((pt or {}).get("warmup_step") or {}).get("total")
    vs_cold = f" ({cold / cd_total:.2f}x against the cold step)" if isinstance(cold, (int, float)) else ""
    print(f"  whole step >= 3x PyTorch eager: {ratio:.2f}x, {'met' if ratio >= 3 else 'NOT met'}{vs_cold}")
else:
    print("  whole step >= 3x PyTorch eager: no result (a side did not finish)")
step_ms = (cd or {}).get("ms_per_image_step")
if isinstance(step_ms, (int, float)):
    print(f"  image decode step <= 3 ms: {step_ms:.3f} ms, {'met' if step_ms <= 3 else 'NOT met'}")
else:
    print("  image decode step <= 3 ms: no result")
EOF
echo "elapsed $(( $(date +%s) - start )) s"
