"""How the code is laid out for reading: modules in layers with no import circle, and opsd.py in the
algorithm's order, the method before the engineering; and no file reads a name that nothing defines."""

import ast
import builtins
import re
import symtable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(module: str) -> set[str]:
    """The project modules that `module` imports anywhere in it, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state = {}  # module -> "open" while its imports are being followed, "done" after

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (circle := visit(imported, path + [imported])):
                return circle
        state[module] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_the_circle_finder_finds_circles():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_modules_import_each_other_in_no_circle():
    graph = {module: project_imports(module) for module in MODULES}
    assert {"data", "evaluate", "lora", "sampling"} <= graph["opsd"]  # the graph is really read
    assert import_circle(graph) is None, f"an import circle: {' -> '.join(import_circle(graph))}"


def test_each_module_imports_only_those_below_it_in_the_readme_table():
    table = [m for m in re.findall(r"^\| `(\w+)\.py` \|", (ROOT / "README.md").read_text(), re.MULTILINE)]
    assert sorted(table) == MODULES
    for i, module in enumerate(table):
        assert project_imports(module) <= set(table[i + 1:]), f"{module} imports a module above it"


def test_opsd_reads_in_the_order_of_the_algorithm():
    tree = ast.parse((ROOT / "opsd.py").read_text())
    order = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    expected = ["collect_rollouts", "completion_logits", "divergence", "opsd_loss", "train_step",
                "fused_divergence", "Config", "save_checkpoint", "train"]
    assert [name for name in order if name in expected] == expected


def test_no_function_is_longer_than_about_80_lines():
    for module in MODULES:
        for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 85, f"{module}.{node.name} is too long to read at once"


def test_the_readme_gives_each_modules_line_count():
    readme = (ROOT / "README.md").read_text()
    counts = {m: len((ROOT / f"{m}.py").read_text().splitlines()) for m in MODULES}
    assert dict(re.findall(r"^\| `(\w+)\.py` \| ([\d,]+) \|", readme, re.MULTILINE)) == {
        m: f"{n:,}" for m, n in counts.items()}, "update the line counts in the README's file table"
    assert f"`opsd.py` ({counts['opsd']:,} lines), on five small ones ({sum(counts.values()):,} lines in all)" in readme


def undefined_names(source: str, name: str = "<string>") -> set[str]:
    """The names that a module's code reads but that neither it (assigned, imported, a def or class, at the top or
    through `global`) nor Python's builtins define: a misspelt name in a branch that never runs here (on a GPU only)
    would raise its NameError there."""
    def scopes(scope):
        yield scope
        for child in scope.get_children():
            yield from scopes(child)
    table = symtable.symtable(source, name, "exec")
    symbols = [(scope, symbol) for scope in scopes(table) for symbol in scope.get_symbols()]
    defined = {s.get_name() for scope, s in symbols
               if (scope is table or s.is_declared_global()) and (s.is_assigned() or s.is_imported())}
    read = {s.get_name() for scope, s in symbols if s.is_referenced() and (scope is table or s.is_global())}
    return read - defined - set(dir(builtins)) - {"__file__"}


def test_no_code_reads_a_name_nothing_defines_not_even_a_branch_only_a_gpu_takes():
    assert undefined_names("def f(device):\n    return device == 'cuda' and skips\n") == {"skips"}
    assert not undefined_names("import os\ndef f(x):\n    y = os.sep\n    return [z for z in x if z != y], len(x)\n")
    assert not undefined_names("def f():\n    global X\n    X = 1\ndef g():\n    return X\n")
    paths = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("tiny/*.py")]
    found = {p.relative_to(ROOT).as_posix(): names for p in paths if (names := undefined_names(p.read_text(), p.name))}
    assert not found
