#!/usr/bin/env bash
# For whenever a machine with an NVIDIA GPU is at hand; it finishes within 9 minutes (each part has its own
# time limit and a part that fails or runs out of time does not stop the others). It runs the sampler, fused
# divergence and LoRA tests with CUDA visible, the sampler benchmark (the plain loop, the fast path and
# generate, on 32 rollouts of 128 tokens in Qwen3-1.7B's shape), two OPSD steps of the paper's recipe in that
# shape with the fast sampler (the step time and its split), and the divergence benchmark on CUDA (with
# Liger's fused linear JSD if liger-kernel is installed). Record what it prints in the README with the card.
#
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)" || exit 1
part() {  # part SECONDS COMMAND...: runs it, says so if it failed or ran out of time, and goes on
    local limit=$1; shift
    timeout "$limit" "$@" || echo "*** failed or out of time (${limit} s): $*"
}
part 80 python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_fused.py tests/test_lora.py
part 150 python3 benchmarks/sampler.py --max_new_tokens 128
part 160 python3 benchmarks/real_shape.py --steps 2 --no-gradient_checkpointing --fast_sampling
part 150 python3 benchmarks/divergence.py --device cuda
