#!/usr/bin/env bash
# Every GPU figure the project needs, in one run of at most ~8 minutes on one H100/H200-class GPU:
#   1. preflight: the libraries import, their versions, the GPU;
#   2. the built-in tiny model end to end through the CLI on CUDA in 4-bit: train, eval, merge, generate;
#   3. benchmarks/harness.py on a random-init model with Llama-2-7B's shapes (built once, reused):
#      QLoRA at 1024 tokens and LoRA at 2048, plain padded TRL + PEFT vs ours vs each speed option,
#      with `sftbridge plan`'s predicted peak beside each measured one;
#   4. with 2 or more GPUs (before 3): train.fsdp (accelerate's own FSDP2 path on CUDA, QLoRA with bf16
#      storage) on the built-in model end to end, and 4 steps of the 7B shapes with each GPU's peak memory
#      (nvidia-smi) beside `sftbridge plan`'s per-GPU prediction; with one GPU it is recorded as skipped
#      (on the CPU, tests/test_fsdp.py runs FSDP2 with gloo).
# Attention is sdpa throughout: flash-attn's wheel is far too large to travel to the device machine.
#
#   make gpu-wheels                                   # here: the missing packages as wheels, in .whl/
#   bash benchmarks/gpu_check.sh --out "$OUT"          # there (the `device` tool, carry [".whl"])
#   bash benchmarks/gpu_check.sh --smoke --results D   # the same steps on the CPU, tiny model, ~2-3 min
#
# Writes <results>/harness-7b-qlora-1024-gpu.{md,json}, harness-7b-lora-2048-gpu.{md,json} and
# e2e-qlora-gpu.{md,json} (with --smoke: *-smoke.*), fsdp-gpu.md with 2+ GPUs, a log beside them, and copies
# all of it to --out.
# A step that fails is recorded and the next one runs; the harness skips variants that would overrun
# the time budget (--budget, seconds for the whole script) and says so in its table.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
RESULTS=benchmarks/results
OUT_DIR=""
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --results) RESULTS=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "usage: $0 [--smoke] [--results DIR] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
    esac
    shift
done

if [ "$SMOKE" = 1 ]; then
    PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    DEVICE=cpu SUFFIX=smoke
    MODEL=builtin:tiny-llama            # a 7B on 2 CPU cores would take hours
    # bitsandbytes' CPU kernels run 4-bit, but ~5x slower than fp32 here: the end-to-end run keeps 4-bit (the
    # QLoRA code path), the harness's "qlora" configuration runs in fp32
    QLORA=(--max-length 128 --batch-size 4) LORA=(--max-length 256 --batch-size 2)
    HARNESS=(--steps 5 --examples 200 --threads 1)  # 5: the median step time skips 2 warm-up steps
    LORA_VARIANTS=(baseline group_by_length)  # every variant once (the first configuration) is enough here
    E2E=(train.max_steps=6) E2E_LIMIT=8
else
    PY=${PYTHON:-python3}
    DEVICE=cuda SUFFIX=gpu
    MODEL=random:meta-llama/Llama-2-7b-hf
    QLORA=(--max-length 1024 --batch-size 4) LORA=(--max-length 2048 --batch-size 2)
    # 10 steps: the median step time skips 2 warm-up steps; a variant's wall time is mostly loading the 7B
    QLORA+=(--load-in-4bit)
    HARNESS=(--steps 10 --threads 0)
    E2E=(train.epochs=10) E2E_LIMIT=100
fi
QLORA_TAG=$([ "$SMOKE" = 1 ] && echo tiny-lora-128 || echo 7b-qlora-1024)
LORA_TAG=$([ "$SMOKE" = 1 ] && echo tiny-lora-256 || echo 7b-lora-2048)
# Most telling first: under the budget the last ones are the ones skipped.
VARIANTS=(baseline group_by_length sftbridge packing padding_free paged_adamw_8bit liger gradient_checkpointing)
[ "$SMOKE" = 1 ] || LORA_VARIANTS=("${VARIANTS[@]}")

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/gpu-check-$SUFFIX.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
exec > >(tee "$LOG") 2>&1

copy_out() {
    [ -n "$OUT_DIR" ] || return 0
    mkdir -p "$OUT_DIR"
    cp "$RESULTS"/*-"$SUFFIX".md "$RESULTS"/*-"$SUFFIX".json "$LOG" "$OUT_DIR"/ 2>/dev/null || true
}
trap copy_out EXIT

step() { echo; echo "=== $* ($SECONDS s of $BUDGET)"; }
STATUS=()
record() {  # NAME EXIT-STATUS
    local state=ok
    [ "$2" = 0 ] || state="failed (exit $2)"
    STATUS+=("$1: $state")
    echo ">>> $1: $state at $SECONDS s"
}

# The device machine has no sftbridge installed and no registry: the repository's src/ and the carried
# wheels (make gpu-wheels) go on the path.
if [ "$SMOKE" = 0 ] && [ -d .whl ]; then
    step "installing the carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export SFTBRIDGE_CACHE="$WORK/cache"
CLI=("$PY" -m sftbridge.cli)

step "preflight"
"$PY" - "$DEVICE" <<'EOF' || { echo "preflight failed: nothing else can run"; exit 1; }
import importlib, sys
import torch
names = ["transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "pydantic", "pyarrow"]
if sys.argv[1] == "cuda":
    names += ["bitsandbytes", "liger_kernel"]
    assert torch.cuda.is_available(), "no CUDA device"
    print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print("torch", torch.__version__, "python", sys.version.split()[0])
for name in names:
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
import sftbridge.config, sftbridge.training.train  # noqa: E401,F401  (our own imports, pydantic included)
EOF

step "end to end: the built-in tiny model, 4-bit, through the CLI"
E2E_DIR="$WORK/e2e"
mkdir -p "$E2E_DIR"
QUESTION="What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"
e2e_start=$SECONDS
# 4-bit on the CPU too: bitsandbytes 0.50 has CPU kernels (slow, but the same code path)
"${CLI[@]}" train configs/tiny-cpu.yaml --run-dir "$E2E_DIR/run" model.load_in_4bit=true "train.device=$DEVICE" \
    "${E2E[@]}" train.save_steps=1000 train.logging_steps=2
record train $?
"${CLI[@]}" eval "$E2E_DIR/run" --device "$DEVICE" --limit "$E2E_LIMIT" --json "$E2E_DIR/eval.json"
record eval $?
"${CLI[@]}" merge "$E2E_DIR/run" --out "$E2E_DIR/merged" --device "$DEVICE"
record merge $?
"${CLI[@]}" generate "$E2E_DIR/run" --device "$DEVICE" "$QUESTION" | tee "$E2E_DIR/generate.txt"
record generate $?
"$PY" - "$E2E_DIR" "$RESULTS/e2e-qlora-$SUFFIX" "$((SECONDS - e2e_start))" "${STATUS[@]}" <<'EOF'
import json, sys
from pathlib import Path
from sftbridge.errors import UserError
from sftbridge.runs import load_manifest
e2e, out, seconds, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
try:
    manifest = load_manifest(e2e / "run").model_dump(mode="json")
except UserError as exc:
    manifest = {"error": str(exc)}
metrics_file = e2e / "run" / "metrics.jsonl"
losses = [r["loss"] for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r] \
    if metrics_file.is_file() else []
merged = e2e / "merged"
report = {
    "steps": dict(s.split(": ", 1) for s in steps),
    "seconds": seconds,
    "device": manifest.get("device"),
    "load_in_4bit": manifest.get("base_model", {}).get("load_in_4bit"),
    "global_step": manifest.get("metrics", {}).get("global_step"),
    "loss_first": losses[0] if losses else None,
    "loss_last": losses[-1] if losses else None,
    "eval": json.loads((e2e / "eval.json").read_text()) if (e2e / "eval.json").is_file() else None,
    "merged_files": sorted(p.name for p in merged.iterdir()) if merged.is_dir() else [],
    "generate": (e2e / "generate.txt").read_text() if (e2e / "generate.txt").is_file() else "",
}
out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
lines = [
    "# End to end: the built-in tiny model, 4-bit nf4, through the CLI",
    "",
    f"- device: {report['device']}; {seconds} s for the four commands",
    f"- steps: {', '.join(steps)}",
    f"- train: {report['global_step']} steps, loss {report['loss_first']} -> {report['loss_last']}",
    f"- eval: {json.dumps(report['eval'])[:600] if report['eval'] else 'none'}",
    f"- merged folder: {', '.join(report['merged_files']) or 'none'}",
    "- generate:",
    "",
    "```",
    report["generate"].strip(),
    "```",
    "",
]
out.with_suffix(".md").write_text("\n".join(lines))
print("\n".join(lines))
EOF

harness() {  # NAME TAG VARIANTS... -- harness-arguments...: gets an even share of the budget left
    local name=$1 tag=$2 left share variants=()
    shift 2
    while [ "$1" != -- ]; do variants+=("$1"); shift; done
    shift
    left=$((BUDGET - SECONDS - 15))
    share=$([ "$name" = qlora ] && echo $((left / 2)) || echo "$left")
    step "harness: $tag (budget $share s)"
    "$PY" benchmarks/harness.py --device "$DEVICE" --model "$MODEL" "${HARNESS[@]}" --repeats 1 \
        --only "${variants[@]}" --name "harness-$tag-$SUFFIX" --results "$RESULTS" \
        --model-cache "$WORK/models" --budget "$share" --startup-repeats 0 "$@"
    record "harness $tag" $?
}

if [ "$SMOKE" = 0 ]; then
    step "building the random-init 7B once (bf16, on the GPU)"
    "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from harness import build_random_model
build_random_model('$MODEL', Path('$WORK/models') / '${MODEL#random:}'.replace('/', '--'))
"
    record "build 7B" $?
fi
GPUS=$([ "$SMOKE" = 0 ] && "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$SMOKE" = 0 ] && [ "$GPUS" -ge 2 ]; then
    step "FSDP on 2 GPUs: the built-in model end to end, then the 7B shapes against plan"
    FSDP_DIR="$WORK/fsdp"
    mkdir -p "$FSDP_DIR"
    FSDP=(backend.num_processes=2 train.fsdp=true model.load_in_4bit=true train.device=cuda)
    "${CLI[@]}" train configs/tiny-cpu.yaml --run-dir "$FSDP_DIR/tiny" "${FSDP[@]}" train.max_steps=20 \
        train.save_steps=10 train.logging_steps=5
    record "fsdp train (tiny)" $?
    "${CLI[@]}" generate "$FSDP_DIR/tiny" --device cuda "$QUESTION"
    record "fsdp generate (tiny)" $?
    SEVEN_NAME=${MODEL#random:}
    SEVEN_B="$WORK/models/${SEVEN_NAME//\//--}"  # where the build step above put it
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$FSDP_DIR/smi.csv" &
    SMI=$!
    "${CLI[@]}" train configs/llama2-7b-chat-qlora.yaml --run-dir "$FSDP_DIR/7b" "${FSDP[@]}" \
        "model.name_or_path=$SEVEN_B" train.max_steps=4 train.answer_metrics=false train.save_steps=1000
    record "fsdp train (7B shapes, 4-bit)" $?
    kill "$SMI"
    GPU_KEY=$("$PY" -c "
import torch
from sftbridge.planning.hardware import GPUS
name = torch.cuda.get_device_name(0)
print(next((key for key, gpu in GPUS.items() if gpu.name == name), 'h100'))")
    "${CLI[@]}" plan configs/llama2-7b-chat-qlora.yaml "model.name_or_path=$SEVEN_B" "${FSDP[@]}" \
        --gpu "$GPU_KEY" --json > "$FSDP_DIR/plan.json"
    record "fsdp plan" $?
    "$PY" - "$FSDP_DIR" "$RESULTS/fsdp-$SUFFIX.md" <<'EOF'
import json, sys
from pathlib import Path
d, out = Path(sys.argv[1]), Path(sys.argv[2])
peaks = {}
for line in (d / "smi.csv").read_text().splitlines():
    index, used = (int(x) for x in line.split(","))
    peaks[index] = max(peaks.get(index, 0), used)
text = (d / "plan.json").read_text()
f = (json.loads(text).get("fsdp_memory_bytes") if text.strip() else None) or {}
lines = [
    "# FSDP on 2 GPUs: the 7B-shaped random model in 4-bit (bf16 storage), 4 steps",
    "",
    f"- measured peak per GPU (nvidia-smi, MiB, the whole process with its CUDA context): {peaks}",
    f"- plan per GPU: training {f.get('peak_total', 0) / 2**20:.0f} MiB, loading {f.get('load_peak', 0) / 2**20:.0f} MiB",
    "",
]
out.write_text("\n".join(lines))
print("\n".join(lines))
EOF
elif [ "$SMOKE" = 0 ]; then
    record "fsdp (needs 2 GPUs, found $GPUS): skipped" 0
fi

harness qlora "$QLORA_TAG" "${VARIANTS[@]}" -- "${QLORA[@]}"
harness lora "$LORA_TAG" "${LORA_VARIANTS[@]}" -- "${LORA[@]}"

step "done"
printf '%s\n' "${STATUS[@]}"
ls -la "$RESULTS"/*-"$SUFFIX".*
