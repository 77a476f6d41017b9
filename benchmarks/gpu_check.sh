#!/usr/bin/env bash
# For whenever a machine with an NVIDIA GPU is at hand; it finishes within 10 minutes. It runs the fast tests
# with CUDA visible (training, LoRA and CLI tests load their models on the GPU, deterministically), the
# sampler benchmark (the plain loop against generate, dynamic and static cache) and two OPSD steps on a random
# model with Qwen3-1.7B's shape in bf16 with LoRA, which print the card, the peak memory, the step time, the
# tokens per second and the step's time split. Record the last lines in the README with the card's name.
#
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -m "not slow" -p no:cacheprovider
timeout 150 python3 benchmarks/sampler.py --max_new_tokens 128
timeout 300 python3 benchmarks/real_shape.py --steps 2 --no-gradient_checkpointing
