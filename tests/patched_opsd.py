"""opsd.py with two test hooks, for test_distributed.py; runs under python or torchrun like opsd.py itself.

    --fixed_rollouts   each completion is a function of its prompt alone (of different lengths), so one process
                       and two torchrun processes train on the same tokens
    --crash_after N    rank 0 stops the run right after it has written the checkpoint of step N
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opsd  # noqa: E402


def fixed_rollouts(model, prompts, *args):
    return [[4 + 7 * token % 90 for token in prompt[-(2 + len(prompt) % 5):]] for prompt in prompts]


def crash_after(n):
    save = opsd.save_checkpoint

    def save_then_crash(out, step, *args):
        save(out, step, *args)
        if step == n:
            raise KeyboardInterrupt(f"stopped after step {n}")
    return save_then_crash


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixed_rollouts", action="store_true")
    parser.add_argument("--crash_after", type=int, default=0)
    hooks, rest = parser.parse_known_args()
    if hooks.fixed_rollouts:  # collect_rollouts calls opsd's global name `sample`, which this replaces
        opsd.sample = fixed_rollouts
    if hooks.crash_after:
        opsd.save_checkpoint = crash_after(hooks.crash_after)
    opsd.train(opsd.parse_config(rest))
