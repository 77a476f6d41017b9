"""benchmarks/divergence.py: peak memory and time of the full-vocabulary divergence, several ways.

(a) eager: a TRL-style generalised JSD on materialised logits (two log-softmaxes, a stacked logsumexp
    mixture, two F.kl_div), (b) opsd.divergence on materialised logits, (c) opsd.fused_divergence, and on
    CUDA (bf16) (d) fused_divergence with a frozen head (LoRA: no (V, H) gradient) and, when liger-kernel is
    installed, (e) its Triton fused linear JSD (LigerFusedLinearJSD) with the head's gradient accumulated in
    bf16 (its default) and (f) in float32, as fused_divergence accumulates it.
Each computes forward + backward of JSD(beta=0.5) from hidden states (N, H) and an LM head (V, H), so the
head's matmuls and its gradient (V x H, 0.6 GB at H = 1024 in float32) count for all. Memory is the peak above
what the inputs took. On the CPU every measurement runs in a process of its own (the resident set is the
measure) after a small warm-up; on CUDA all run in one process (torch's allocator is the measure), each after
an untimed call at its own shape, so that Triton's and cuBLAS's first-call work is not timed. A variant that
would not fit is skipped and said so. --results appends each cell as a JSON line.

    python benchmarks/divergence.py            # V = 151,936; CPU: H = 1024, 2048, N = 512 .. 8192 (about 20 min);
                                               # CUDA, bf16: H = 2048, N = 1,024 .. 16,384
    python benchmarks/divergence.py --device cuda    # the GPU rows only
    python benchmarks/divergence.py --quick    # small sizes, seconds
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opsd import divergence, fused_divergence  # noqa: E402
from real_shape import record  # noqa: E402

BETA = 0.5
# glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so the resident set
# would count the fused path's freed 20 MB chunks as if alive; a fixed 1 MiB threshold returns every freed
# tensor to the system, for all three variants alike, and the resident set follows the live tensors.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def eager_jsd(student_logits, teacher_logits, mask, beta=BETA):
    """The generalised JSD as trainers built on TRL's GKD compute it: every step materialises (N, V)."""
    student_logp = F.log_softmax(student_logits.float(), -1)
    teacher_logp = F.log_softmax(teacher_logits.float(), -1)
    beta_t = torch.tensor(beta, device=student_logits.device)
    mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - beta_t), teacher_logp + torch.log(beta_t)]), 0)
    kl_teacher = F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_logp, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)[mask].mean()


def current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident set


def measure(variant: str, N: int, H: int, V: int, device: str, warmup: bool = True) -> dict:
    """One forward + backward, after an untimed one (at this shape on CUDA, a small one on the CPU)."""
    if warmup:
        measure(variant, *((N, H, V) if device == "cuda" else (8, 64, 1000)), device, warmup=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=g, dtype=dtype).requires_grad_(True)
    teacher_hidden = torch.randn(N, H, device=device, generator=g, dtype=dtype)
    weight = (torch.randn(V, H, device=device, generator=g, dtype=dtype) * H ** -0.5).requires_grad_(
        variant != "fused, frozen head")
    mask = torch.ones(N, dtype=torch.bool, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set to the current one
    base = current_bytes(device)
    start = time.perf_counter()
    if variant.startswith("fused"):
        loss = fused_divergence(hidden, teacher_hidden, weight, mask, BETA)
    elif variant.startswith("liger"):
        from liger_kernel.transformers import LigerFusedLinearJSD
        jsd = LigerFusedLinearJSD(jsd_beta=BETA, accum_dtype=torch.float32 if "float32" in variant else None)
        loss = jsd(hidden, weight, teacher_hidden, weight.detach(), None)  # None: no labels, every row counts
    else:
        with torch.no_grad():
            teacher_logits = teacher_hidden @ weight.T  # (N, V)
        student_logits = hidden @ weight.T  # (N, V)
        loss = (eager_jsd if variant == "eager" else divergence)(student_logits, teacher_logits, mask, BETA)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        status = Path("/proc/self/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_gb": peak / 1e9, "loss": loss.item()}


def fits(N: int, V: int, device: str) -> bool:
    """The materialised paths keep about 16 (N, V) float32 tensors alive at their peak (measured here)."""
    need = 16 * N * V * 4
    if device == "cuda":
        return need < 0.9 * torch.cuda.mem_get_info()[0]
    available = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1])
    return need < 0.8 * available * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V = 8,192, H = 128 (CUDA: 256), N = 128 and 256 (512)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="one device only (default: the CPU, and CUDA "
                        "if there is one)")
    parser.add_argument("--results", help="append each measurement to this JSONL file")
    parser.add_argument("--one", nargs=5, metavar=("VARIANT", "N", "H", "V", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, N, H, V, device = args.one
        print(json.dumps(measure(variant, int(N), int(H), int(V), device)))
        return

    V, shapes = 151_936, {"cpu": ([1024, 2048], [512, 1024, 2048, 4096, 8192]),  # (hidden sizes, token counts)
                          "cuda": ([2048], [1024, 2048, 4096, 8192, 16384])}
    if args.quick:
        V, shapes = 8192, {"cpu": ([128], [128, 256]), "cuda": ([256], [256, 512])}
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    liger = importlib.util.find_spec("liger_kernel") is not None
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"V = {V:,}, JSD beta = {BETA}, forward + backward, peak memory above the inputs; {os.cpu_count()} CPU "
          f"threads; {machine}; torch {torch.__version__}" + ("" if liger or "cuda" not in devices else
                                                               "; liger-kernel is not installed"), flush=True)
    for device in devices:
        variants = ["eager", "plain", "fused"] + (["fused, frozen head"] + ["liger, bf16 sums", "liger, float32 sums"]
                                                  * liger if device == "cuda" else [])
        for H in shapes[device][0]:
            for N in shapes[device][1]:
                cells = []
                for variant in variants:
                    row = {"part": "divergence", "device": device, "variant": variant, "N": N, "H": H, "V": V}
                    if variant in ("eager", "plain") and not fits(N, V, device):
                        row["skipped"] = "does not fit"
                    elif device == "cuda":  # one process: the allocator's peak is per measurement
                        try:
                            row.update(measure(variant, N, H, V, device))
                        except Exception as e:  # noqa: BLE001 (one cell of the table: report it and go on)
                            row["failed"] = f"{type(e).__name__}: {e}"[:300]
                        torch.cuda.empty_cache()
                    else:
                        done = subprocess.run([sys.executable, __file__, "--one", variant, str(N), str(H), str(V),
                                               device], capture_output=True, text=True, env=CHILD_ENV)
                        row.update(json.loads(done.stdout) if done.returncode == 0 else {"failed": done.stderr[-300:]})
                    record(args.results, row)
                    cells.append(f"{variant} " + (f"{row['peak_gb']:.2f} GB {row['seconds']:.3f} s" if "seconds" in row
                                                  else row.get("skipped") or "failed: " + row["failed"]))
                print(f"{device} H {H} N {N}: " + " | ".join(cells), flush=True)

if __name__ == "__main__":
    main()
