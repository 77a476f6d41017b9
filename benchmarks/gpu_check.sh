#!/usr/bin/env bash
# The GPU check: one call, at most 9 minutes, decides whether opsd's fast paths work on this GPU and how fast
# they are. Each part has its own time limit and fails alone; each prints its lines as it goes and appends JSON
# to the results file; one PASS/FAIL line per goal closes it.
#   preflight    installs the wheels in .whl/ if there are any, prints the versions, refuses transformers < 5.24
#   correctness  the fast sampler on a tiny Qwen3 in float32 (greedy tokens equal to the plain loop's, seeded draws
#                reproducible, CUDA graphs without a silent fallback: TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1), then the
#                sampler and fused-divergence tests with CUDA visible
#   rollouts     benchmarks/sampler.py: Qwen3-1.7B's shape, bf16, LoRA r64, 32 x 1,024 tokens at T 1.1, top-p 0.95,
#                top-k 20: the fast path against the plain loop and transformers' generate, and a profile
#   step         benchmarks/real_shape.py: two OPSD steps of the recipe in that shape with the fast sampler
#   divergence   benchmarks/divergence.py on CUDA: eager, ours (trained and frozen head), Liger if installed
# Goals: rollouts >= 5,000 generated tokens/s (aim: 10,000); a recipe step <= 15 s; the fused divergence at least
# as fast as Liger's fused linear JSD at no more memory.
#
#     bash benchmarks/gpu_check.sh [RESULTS] 2>&1 | tee gpu_check.log   # RESULTS: default gpu_check.jsonl
#     bash benchmarks/gpu_check.sh --cpu [RESULTS]   # the same parts at tiny shapes on a CPU: tests the script
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
results=$(realpath -m "${1:-gpu_check.jsonl}")
: > "$results"
part() {  # part NAME SECONDS COMMAND...: runs it, says so if it failed or ran out of time, and goes on
    local name=$1 limit=$2; shift 2
    echo "=== $name (at most $limit s): $*"
    timeout "$limit" "$@" || echo "{\"part\": \"$name\", \"failed\": \"exit $? (124: out of time)\"}" | tee -a "$results"
}

echo "=== preflight"
if [ $cpu = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried to a machine without the internet
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
[ $cpu = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - "$results" "$cpu" <<'EOF' || exit 1
import json, sys
import huggingface_hub, torch, transformers
from packaging.version import Version
row = {"part": "preflight", "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
       "huggingface_hub": huggingface_hub.__version__}
print(json.dumps(row))
open(sys.argv[1], "a").write(json.dumps(row) + "\n")
assert sys.argv[2] == "1" or torch.cuda.is_available(), "torch sees no CUDA device"
assert Version(transformers.__version__) >= Version("5.24"), (
    f"transformers {transformers.__version__} ignores cache= (before 5.24): carry its 5.24 wheel in .whl/")
EOF

if [ $cpu = 1 ]; then  # tiny shapes, no inductor (its CPU compilation alone takes minutes): the script is what
    tiny=(--tiny --backend eager)  # is tested, so the limits leave room for a busy machine
    part correctness 300 python3 benchmarks/sampler.py --check --backend eager --results "$results"
    part rollouts 300 python3 benchmarks/sampler.py "${tiny[@]}" --results "$results"
    part step 300 python3 benchmarks/real_shape.py "${tiny[@]}" --steps 2 --reference_tokens 50 --fast_sampling \
        --results "$results"
    part divergence 300 python3 benchmarks/divergence.py --quick --device cpu --results "$results"
else
    TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 part correctness 110 python3 benchmarks/sampler.py --check --results "$results"
    part tests 50 bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_sampling.py \
        -k 'cuda or fast' && echo '{\"part\": \"tests\", \"ok\": true}' >> '$results'"
    part rollouts 150 python3 benchmarks/sampler.py --results "$results"
    part step 150 python3 benchmarks/real_shape.py --steps 2 --no-gradient_checkpointing --fast_sampling \
        --results "$results"
    part divergence 60 python3 benchmarks/divergence.py --device cuda --results "$results"
fi

echo "=== goals"
python3 - "$results" "$cpu" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
cpu = sys.argv[2] == "1"
def part(name):
    return [r for r in rows if r.get("part") == name]
def verdict(ok, goal, measured):
    print(f"{'PASS' if ok else 'FAIL'} {goal}: {measured}")
check, tests = part("check"), part("tests")
verdict(check and check[-1]["ok"] and (cpu or (tests and tests[-1].get("ok"))),
        "correctness (fast == plain, seeded, no CUDA-graph fallback" + ", the CUDA tests)" * (not cpu) + ")" * cpu,
        [check[-1] if check else "no result"] + ([] if cpu else [tests[-1] if tests else "no tests result"]))
fast = [r for r in part("rollouts") if r.get("method", "").startswith("fast path") and "tokens_per_s" in r]
rate = fast[-1]["tokens_per_s"] if fast else 0
verdict(fast and (cpu or rate >= 5000), "rollouts >= 5,000 tokens/s (aim 10,000)" + " [CPU mode: ran]" * cpu,
        f"{rate:.0f} tokens/s, {fast[-1]['ms_per_step']:.2f} ms per decode step" if fast else "no result")
step = [r for r in part("step") if "step_s" in r]
verdict(step and (cpu or step[-1]["step_s"] <= 15), "a recipe step <= 15 s" + " [CPU mode: ran]" * cpu,
        f"{step[-1]['step_s']:.1f} s" if step else "no result")
cells = {(r["variant"], r["N"]): r for r in part("divergence") if "seconds" in r}
sizes = sorted({r["N"] for r in part("divergence") if r["variant"] == "fused"})  # every N must have both cells
liger = [(n, cells[("fused", n)], cells[("liger, bf16 sums", n)]) for n in sizes if {("fused", n), ("liger, bf16 sums", n)} <= cells.keys()]
ok = len(liger) == len(sizes) and all(f["seconds"] <= l["seconds"] and f["peak_gb"] <= l["peak_gb"] for _, f, l in liger)
verdict(any(v == "fused" for v, _ in cells) and (cpu or (liger and ok)),
        "fused divergence as fast as Liger at no more memory" + " [CPU mode: ran]" * cpu,
        "; ".join(f"N {n}: {f['seconds']:.3f} s {f['peak_gb']:.2f} GB vs {l['seconds']:.3f} s {l['peak_gb']:.2f} GB"
                  for n, f, l in liger) or ("no Liger cell" if cells else "no result"))
EOF
