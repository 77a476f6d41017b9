"""tutorial.ipynb and tutorial_solutions.ipynb: they run top to bottom, the tutorial imports what it teaches,
and each exercise's check accepts right answers (the solution and others) and rejects wrong ones."""

import ast
import re
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
SOLUTIONS = nbformat.read(ROOT / "tutorial_solutions.ipynb", as_version=4)


def tagged(notebook, tag: str) -> str:
    sources = [c.source for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(sources) == 1, f"one cell tagged {tag!r} expected, found {len(sources)}"
    return sources[0]


# For each exercise, answers other than the solution's that are right, and typical wrong ones. Exercises 2, 4, 6
# and 7 also ask for predictions: PREDICTIONS holds the right ones, added to every answer that is not about them.
PREDICTIONS = {
    2: "\nmode_seeking = 'reverse'",
    4: "\nin_expectation = 'reverse KL'",
    6: "\nteacher_decays = {'fixed': 1, 'current': 0}\nbf16_moved = 'almost none'",
    7: "\nteacher_writes = \"the reference's answer\"",
}
RIGHT = {
    1: ["completion_token_logp = lambda logits, ids, L: token_log_probs(logits[:, -L - 1:-1], ids[:, -L:])",
        "def completion_token_logp(logits, ids, L):  # in float64\n"
        "    P = ids.shape[1] - L\n"
        "    return F.log_softmax(logits[:, P - 1:P + L - 1].double(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)",
        "completion_token_logp = lambda logits, ids, L: torch.stack([logits[:, -L - 1 + j].log_softmax(-1).gather("
        "-1, ids[:, -L + j, None])[:, 0] for j in range(L)], 1)"],
    2: ["closer = {'forward': 'b', 'reverse': 'a'}",
        "closer = {'Forward KL': 'b', 'reverse KL': 'A '}\nmode_seeking = 'Reverse KL'",
        "closer = {'forward': 'student B', 'reverse': 'Student A'}\nmode_seeking = 'reverse-KL'"],
    3: ["def jsd(s, t, beta):\n"
        "    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))\n"
        "    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)",
        "def jsd(s, t, beta):  # the max trick by hand\n"
        "    a, b = t + math.log(beta), s + math.log(1 - beta)\n"
        "    top = torch.maximum(a, b)\n"
        "    m = top + ((a - top).exp() + (b - top).exp()).log()\n"
        "    kl = lambda p: F.kl_div(m, p, log_target=True, reduction='none').sum(-1)\n"
        "    return beta * kl(t) + (1 - beta) * kl(s)",
        "def jsd(s, t, beta):  # in float64, where exp(-300) does not round to 0\n"
        "    s, t = s.double(), t.double()\n"
        "    m = (beta * t.exp() + (1 - beta) * s.exp()).log()\n"
        "    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)"],
    4: ["def sampled_token_grad(z, t, y):\n"
        "    z = z.clone().requires_grad_()\n"
        "    s = z.log_softmax(-1)\n"
        "    (-(t.log_softmax(-1)[y] - s[y]).detach() * s[y]).backward()\n"
        "    return z.grad",
        "def sampled_token_grad(z, t, y):\n"
        "    p = z.softmax(-1)\n"
        "    a = t.log_softmax(-1)[y] - p[y].log()\n"
        "    g = a * p\n"
        "    g[y] -= a\n"
        "    return g",
        "def sampled_token_grad(z, t, y):  # in float32, whatever the input\n"
        "    z, t = z.float(), t.float()\n"
        "    a = t.log_softmax(-1)[y] - z.log_softmax(-1)[y]\n"
        "    return -a * (F.one_hot(torch.tensor(y), len(z)).float() - z.softmax(-1))",
        "sampled_token_grad = lambda z, t, y: -(t.log_softmax(-1)[y] - z.log_softmax(-1)[y]) * "
        "(F.one_hot(torch.tensor(y), len(z)).to(z.dtype) - z.softmax(-1))\nin_expectation = 'Reverse'"],
    5: ["def batch_loss(model, teacher, sp, tp, c, beta):\n"
        "    t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence(s, t.detach(), mask, beta)",
        "def batch_loss(model, teacher, sp, tp, c, beta):\n"
        "    with torch.no_grad():\n"
        "        t = F.log_softmax(completion_logits(teacher, tp, c)[0], -1)\n"
        "    z, mask = completion_logits(model, sp, c)\n"
        "    per_token = divergence_terms(F.log_softmax(z, -1), t, beta).sum(-1)\n"
        "    return (per_token * mask).sum() / mask.sum()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # in float64\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence(s.double(), t.double(), mask, beta)"],
    6: ["def ema_update(teacher, student, decay):\n"
        "    with torch.no_grad():\n"
        "        for t, s in zip(teacher.parameters(), student.parameters()):\n"
        "            t.lerp_(s, 1 - decay)",
        "def ema_update(teacher, student, decay):\n"
        "    for t, s in zip(teacher.parameters(), student.parameters()):\n"
        "        t.data = decay * t.data + (1 - decay) * s.data",
        "def ema_update(teacher, student, decay):\n"
        "    s = student.state_dict()\n"
        "    teacher.load_state_dict({k: decay * v + (1 - decay) * s[k] for k, v in teacher.state_dict().items()})",
        "ema_update = update_ema",
        "ema_update = update_ema\nteacher_decays = {'current': 0.0, 'fixed': 1.0}\nbf16_moved = 'almost none'",
        "ema_update = update_ema\nteacher_decays = {'fixed': 1, 'current': 0}\nbf16_moved = 'Almost none '"],
    7: ["def wrong_reference(ex):  # the sums stay right, only the box is wrong\n"
        "    return Example(ex.question, ex.solution.replace('{' + ex.answer + '}', '{' + str(int(ex.answer) + 1) + '}'),"
        " ex.answer)\n"
        "teacher_writes = 'the true answer'  # it follows the sums, not the box",
        "wrong_reference = lambda ex: Example(ex.question, ex.solution.replace('{' + ex.answer + '}', '{' + ex.answer + "
        "'.5}'), ex.answer)\nteacher_writes = 'the true answer'  # a box that is not an integer",
        "wrong_reference = lambda ex: Example(ex.question, '\\\\boxed{' + str(int(ex.answer) + 7) + '}', ex.answer)"],
    8: ["def stable_log_softmax(z):\n"
        "    m = z.max(dim=-1, keepdim=True).values\n"
        "    return z - m - torch.log(torch.sum(torch.exp(z - m), dim=-1, keepdim=True))",
        "def stable_log_softmax(z):\n"
        "    z = z.double()\n"
        "    shifted = z - z.amax(-1, keepdim=True)\n"
        "    return (shifted - shifted.exp().sum(-1, keepdim=True).log()).float()"],
}
WRONG = {
    1: ["completion_token_logp = lambda logits, ids, L: token_log_probs(logits[:, -L:], ids[:, -L:])",  # off by one
        "completion_token_logp = lambda logits, ids, L: token_log_probs(logits[:, -L - 1:-1], ids[:, -L - 1:-1])",
        "completion_token_logp = lambda logits, ids, L: logits[:, -L - 1:-1].gather(-1, ids[:, -L:, None]).squeeze(-1)",
        "completion_token_logp = lambda logits, ids, L: token_log_probs(logits[:, -L - 1:-1], ids[:, -L:]).exp()",
        "completion_token_logp = lambda logits, ids, L: token_log_probs(logits[:, :L], ids[:, -L:])",
        "def completion_token_logp(logits, ids, L):  # P from row 0's length\n"
        "    P = int((ids[0] != PAD).sum()) - L\n"
        "    return token_log_probs(logits[:, P - 1:P + L - 1], ids[:, P:P + L])"],
    2: ["closer = {'forward': 'A', 'reverse': 'B'}", "closer = {'forward': 'A', 'reverse': 'A'}",
        "closer = {'forward': 'B', 'reverse': 'A'}\nmode_seeking = 'forward'",
        "closer = {'forward': 'B', 'reverse': 'A'}\nmode_seeking = None"],
    3: ["def jsd(s, t, beta):  # the weights swapped\n"
        "    m = torch.logaddexp(t + math.log(1 - beta), s + math.log(beta))\n"
        "    return (1 - beta) * (t.exp() * (t - m)).sum(-1) + beta * (s.exp() * (s - m)).sum(-1)",
        "def jsd(s, t, beta):  # a mixture of the log-probabilities\n"
        "    m = beta * t + (1 - beta) * s\n"
        "    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)",
        "def jsd(s, t, beta):  # KL(m || p) instead of KL(p || m)\n"
        "    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))\n"
        "    return beta * (m.exp() * (m - t)).sum(-1) + (1 - beta) * (m.exp() * (m - s)).sum(-1)",
        "def jsd(s, t, beta):  # log m from probabilities that underflow in float32\n"
        "    m = (beta * t.exp() + (1 - beta) * s.exp()).log()\n"
        "    kl = lambda p: F.kl_div(m, p, log_target=True, reduction='none').sum(-1)\n"
        "    return beta * kl(t) + (1 - beta) * kl(s)",
        "def jsd(s, t, beta):  # a naive log of m, its NaN patched in the value only\n"
        "    m = (beta * t.exp() + (1 - beta) * s.exp()).log()\n"
        "    kl = lambda p: torch.nan_to_num(p.exp() * (p - m)).sum(-1)\n"
        "    return beta * kl(t) + (1 - beta) * kl(s)",
        "def jsd(s, t, beta):  # the same, patched with where\n"
        "    m = (beta * t.exp() + (1 - beta) * s.exp()).log()\n"
        "    kl = lambda p: torch.where(p.exp() > 0, p.exp() * (p - m), 0).sum(-1)\n"
        "    return beta * kl(t) + (1 - beta) * kl(s)",
        "def jsd(s, t, beta):  # an epsilon inside the log\n"
        "    m = (beta * t.exp() + (1 - beta) * s.exp() + 1e-8).log()\n"
        "    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)"],
    4: ["sampled_token_grad = lambda z, t, y: (t.log_softmax(-1)[y] - z.log_softmax(-1)[y]) * "
        "(F.one_hot(torch.tensor(y), len(z)).to(z.dtype) - z.softmax(-1))",  # the sign flipped
        "sampled_token_grad = lambda z, t, y: -(t.log_softmax(-1)[y] - z.log_softmax(-1)[y]) * "
        "F.one_hot(torch.tensor(y), len(z)).to(z.dtype)",  # the normaliser forgotten
        "def sampled_token_grad(z, t, y):  # a gradient through A too\n"
        "    z = z.clone().requires_grad_()\n"
        "    s = z.log_softmax(-1)\n"
        "    (-(t.log_softmax(-1)[y] - s[y]) * s[y]).backward()\n"
        "    return z.grad",
        "sampled_token_grad = lambda z, t, y: z.softmax(-1) - t.softmax(-1)",  # the forward KL's gradient
        "sampled_token_grad = lambda z, t, y: -(t.log_softmax(-1)[y] - z.log_softmax(-1)[y]) * "
        "(F.one_hot(torch.tensor(y), len(z)).to(z.dtype) - z.softmax(-1))\nin_expectation = 'forward KL'"],
    5: ["def batch_loss(model, teacher, sp, tp, c, beta):  # the pads are averaged in\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence_terms(log_probs(s, 1.0), log_probs(t, 1.0), beta).sum(-1).mean()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # a mean of per-rollout means\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    per_token = divergence_terms(log_probs(s, 1.0), log_probs(t, 1.0), beta).sum(-1)\n"
        "    return ((per_token * mask).sum(1) / mask.sum(1)).mean()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # the teacher gets a gradient too\n"
        "    t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence_terms(log_probs(s, 1.0), log_probs(t, 1.0), beta).sum(-1)[mask].mean()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # the roles swapped\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence_terms(log_probs(t, 1.0), log_probs(s, 1.0), beta).sum(-1)[mask].mean()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # teacher ignored: the current weights\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(model, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence(s, t, mask, beta)",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # the student scored by the teacher network\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(teacher, sp, c)\n"
        "    return divergence(s, t, mask, beta)",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # the two prompts swapped\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, sp, c)\n"
        "    s, mask = completion_logits(model, tp, c)\n"
        "    return divergence(s, t, mask, beta)",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # calls backward itself\n"
        "    loss = opsd_loss(model, teacher, sp, tp, c, beta=beta, fused=False)\n"
        "    loss.backward()\n"
        "    return loss",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # no_grad around the wrong pass\n"
        "    t, _ = completion_logits(teacher, tp, c)\n"
        "    with torch.no_grad():\n"
        "        s, mask = completion_logits(model, sp, c)\n"
        "    return divergence(s, t, mask, beta)",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # a gradient through the teacher when it is the student\n"
        "    t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    t = log_probs(t if teacher is model else t.detach(), 1.0)\n"
        "    return divergence_terms(log_probs(s, 1.0), t, beta).sum(-1)[mask].mean()",
        "def batch_loss(model, teacher, sp, tp, c, beta):  # a mean over the vocabulary too\n"
        "    with torch.no_grad():\n"
        "        t, _ = completion_logits(teacher, tp, c)\n"
        "    s, mask = completion_logits(model, sp, c)\n"
        "    return divergence_terms(log_probs(s, 1.0), log_probs(t, 1.0), beta).mean(-1)[mask].mean()"],
    6: ["def ema_update(teacher, student, decay):  # decay weighs the student\n"
        "    with torch.no_grad():\n"
        "        for t, s in zip(teacher.parameters(), student.parameters()):\n"
        "            t.copy_((1 - decay) * t + decay * s)",
        "def ema_update(teacher, student, decay):  # a new tensor bound to a name: the teacher never changes\n"
        "    for t, s in zip(teacher.parameters(), student.parameters()):\n"
        "        t = decay * t + (1 - decay) * s",
        "def ema_update(teacher, student, decay):  # in place, but recorded by autograd\n"
        "    for t, s in zip(teacher.parameters(), student.parameters()):\n"
        "        t.mul_(decay).add_(s, alpha=1 - decay)",
        "ema_update = lambda teacher, student, decay: update_ema(student, teacher, decay)  # the student moves",
        "ema_update = update_ema\nteacher_decays = {'fixed': 0, 'current': 1}\nbf16_moved = 'almost none'",
        "ema_update = update_ema\nteacher_decays = {'fixed': 1, 'current': 0}\nbf16_moved = 'most'",
        "ema_update = update_ema\nteacher_decays = None\nbf16_moved = None"],
    7: ["wrong_reference = lambda example: example",
        "wrong_reference = lambda ex: Example(ex.question, ex.solution.replace(ex.answer, '0'), '0')",
        "wrong_reference = lambda ex: Example(ex.question, 'so the answer is ' + str(int(ex.answer) + 2), ex.answer)",
        "wrong_reference = lambda ex: Example(ex.question, ex.solution.replace('{' + ex.answer + '}', '{}'), ex.answer)",
        "wrong_reference = lambda ex: Example(ex.question, ex.solution.replace('{' + ex.answer + '}', '{unknown}'), "
        "ex.answer)",
        "def wrong_reference(ex):  # a right answer, a wrong prediction\n"
        "    wrong = str(int(ex.answer) + 1)\n"
        "    return Example(ex.question, ex.solution.replace(f'={ex.answer}.', f'={wrong}.').replace("
        "'{' + ex.answer + '}', '{' + wrong + '}'), ex.answer)\n"
        "teacher_writes = 'the true answer'"],
    8: ["stable_log_softmax = lambda z: z - z.exp().sum(-1, keepdim=True).log()",  # overflows
        "stable_log_softmax = lambda z: z.softmax(-1).log()",  # log of a probability that rounded to 0
        "stable_log_softmax = lambda z: (z - z.max()) - (z - z.max()).exp().sum(-1, keepdim=True).log()",  # one max
        "stable_log_softmax = lambda z: torch.log_softmax(z, -1)",
        "stable_log_softmax = lambda z: torch.special.log_softmax(z, -1)",
        "stable_log_softmax = lambda z: z - torch.logsumexp(z, -1, keepdim=True)",
        "stable_log_softmax = lambda z: z - z.logsumexp(-1, keepdim=True)",
        "stable_log_softmax = lambda z: z - torch.special.logsumexp(z, -1, keepdim=True)",
        "stable_log_softmax = lambda z: z - torch.logcumsumexp(z, -1)[..., -1:]",
        "stable_log_softmax = lambda z: -torch.stack([F.cross_entropy(z, torch.full((len(z),), v), reduction='none')"
        " for v in range(z.shape[-1])], -1)",
        "import functools\n"
        "stable_log_softmax = lambda z: z - functools.reduce(torch.logaddexp, z.unbind(-1))[..., None]",
        "stable_log_softmax = lambda z: torch.nn.LogSoftmax(-1)(z)",
        "def stable_log_softmax(z):  # reduces over dim 1, which is the last only in 2-D\n"
        "    m = z.max(dim=1, keepdim=True).values\n"
        "    return z - m - torch.log(torch.sum(torch.exp(z - m), dim=1, keepdim=True))"],
}


def with_predictions(number: int, answer: str) -> str:
    """The answer, with the right predictions of its exercise first (an answer may set its own after them)."""
    return PREDICTIONS.get(number, "") + "\n" + answer


def cases(answers: dict) -> list:
    return [pytest.param(n, a, id=f"exercise {n}, answer {i}") for n, some in answers.items() for i, a in enumerate(some)]


@pytest.fixture(scope="module")
def setup_namespace():
    namespace = {}
    exec("import math", namespace)  # for the answers below
    exec(tagged(NOTEBOOK, "setup"), namespace)
    return namespace


def check_with(number, answer_source, setup_namespace, capsys):
    """Runs exercise `number` as the tutorial does (setup, statement, check: "not attempted"), then
    answer_source; returns its check, to call."""
    namespace = dict(setup_namespace)
    exec(tagged(NOTEBOOK, f"exercise-{number}"), namespace)
    exec(tagged(NOTEBOOK, f"check-{number}"), namespace)  # the answer is still None: nothing to check yet
    assert f"exercise {number}: not attempted" in capsys.readouterr().out
    exec(answer_source, namespace)
    return namespace[f"check_{number}"]


@pytest.mark.parametrize("number", range(1, 9))
def test_each_check_passes_on_the_solution(number, setup_namespace, capsys):
    solution = tagged(SOLUTIONS, f"solution-{number}").replace(f"check_{number}()", "")  # called below
    check_with(number, solution, setup_namespace, capsys)()
    assert f"exercise {number}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("number, answer", cases(RIGHT))
def test_each_check_passes_on_other_right_answers(number, answer, setup_namespace, capsys):
    check_with(number, with_predictions(number, answer), setup_namespace, capsys)()
    assert f"exercise {number}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("number, answer", cases(WRONG))
def test_each_check_fails_on_a_wrong_answer_with_a_message(number, answer, setup_namespace, capsys):
    check = check_with(number, with_predictions(number, answer), setup_namespace, capsys)
    with pytest.raises(AssertionError) as error:
        check()
    assert len(str(error.value)) > 20, "the check must say what is wrong"
    assert f"exercise {number}: correct" not in capsys.readouterr().out


def test_the_notebook_imports_what_it_teaches_and_redefines_nothing():
    modules = (opsd, data, evaluate, sampling, lora)
    library = {name for module in modules for name in vars(module) if not name.startswith("_")}
    imported, defined = set(), set()
    for cell in NOTEBOOK.cells + SOLUTIONS.cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.ImportFrom) and node.module in {m.__name__ for m in modules}:
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, ast.Assign):
                    defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    assert {"sample", "completion_logits", "divergence", "opsd_loss", "fused_divergence", "train", "evaluate"} <= imported
    assert not defined & library, f"the notebooks redefine library names: {defined & library}"


@pytest.mark.slow
def test_both_notebooks_run_top_to_bottom():
    from nbclient import NotebookClient
    printed = ""
    for name in ("tutorial.ipynb", "tutorial_solutions.ipynb"):  # the solutions notebook reads the tutorial's checks
        notebook = nbformat.read(ROOT / name, as_version=4)  # a fresh copy: the outputs are replaced
        NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        printed += "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert all(f"exercise {n}: not attempted" in printed and f"exercise {n}: correct" in printed for n in range(1, 9))


def test_the_figures_fit_a_notebook_column():
    """At most 10 inches wide: at the notebook's 100 dpi, legible in a 960-pixel column."""
    widths = [float(w) for cell in NOTEBOOK.cells if cell.cell_type == "code"
              for w in re.findall(r"figsize=\(\s*([\d.]+)\s*,", cell.source)]
    assert len(widths) >= 5 and max(widths) <= 10, f"figure widths {widths}"
