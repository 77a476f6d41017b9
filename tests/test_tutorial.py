"""tutorial.ipynb: it runs top to bottom, it imports what it teaches, and its exercise checks work."""

import ast
from pathlib import Path

import nbformat
import pytest

import data
import evaluate
import lora
import opsd
import sampling

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)


def tagged(tag: str) -> str:
    sources = [c.source for c in NOTEBOOK.cells if tag in c.metadata.get("tags", [])]
    assert len(sources) == 1, f"one cell tagged {tag!r} expected, found {len(sources)}"
    return sources[0]


WRONG_ANSWERS = {  # exercise: an answer that a student might give and that is wrong
    1: "reverse_kl = forward_kl",
    2: "closer = {'forward': 'A', 'reverse': 'B'}",
    3: "sampled_token_grad = lambda z, t, y: (t.log_softmax(-1)[y] - z.log_softmax(-1)[y]) * "
       "(F.one_hot(torch.tensor(y), len(z)).to(z.dtype) - z.softmax(-1))",  # the sign flipped
    4: "wrong_reference = lambda example: example",
    5: "stable_log_softmax = lambda z: z - z.exp().sum(-1, keepdim=True).log()",  # overflows
}


@pytest.mark.parametrize("number", sorted(WRONG_ANSWERS))
def test_each_exercise_check_passes_on_the_solution_and_fails_on_a_wrong_answer(number, capsys):
    namespace = {}
    exec(tagged("setup"), namespace)
    exec(tagged(f"exercise-{number}"), namespace)
    exec(tagged(f"check-{number}"), namespace)  # the answer is still None: nothing to check yet
    assert f"exercise {number}: not attempted" in capsys.readouterr().out
    exec(tagged(f"solution-{number}"), namespace)  # ends by calling the check
    assert f"exercise {number}: correct" in capsys.readouterr().out
    exec(WRONG_ANSWERS[number], namespace)
    with pytest.raises(AssertionError):
        namespace[f"check_{number}"]()


def test_the_notebook_imports_what_it_teaches_and_redefines_nothing():
    modules = (opsd, data, evaluate, sampling, lora)
    library = {name for module in modules for name in vars(module) if not name.startswith("_")}
    imported, defined = set(), set()
    for cell in NOTEBOOK.cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.ImportFrom) and node.module in {m.__name__ for m in modules}:
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, ast.Assign):
                    defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    assert {"sample", "completion_logits", "divergence", "fused_divergence", "train", "evaluate"} <= imported
    assert not defined & library, f"the notebook redefines library names: {defined & library}"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom():
    from nbclient import NotebookClient
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)  # a fresh copy, outputs replaced
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert all(f"exercise {n}: correct" in printed for n in WRONG_ANSWERS)
