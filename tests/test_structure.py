"""The package's import graph, drawn from the source: no circle, and the floors the architecture promises."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every carecl module -> the carecl modules it imports anywhere (function-level imports included)."""
    modules = {module_name(path): path for path in (SRC / "carecl").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        # Importing a.b.c runs the packages a and a.b first.
        targets |= {".".join(t.split(".")[:i]) for t in list(targets) for i in range(1, t.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_src():
    assert cycles(import_graph()) == []


def test_config_sits_on_the_bottom_floor():
    graph = import_graph()
    assert graph["carecl.config"] <= {"carecl.errors", "carecl.registry"}


def test_runs_never_import_upwards():
    graph = import_graph()
    upward = ("carecl.engine", "carecl.methods", "carecl.cli", "carecl.report", "carecl.compat", "carecl.predict")
    for module in (m for m in graph if m.startswith("carecl.runs")):
        assert not [t for t in graph[module] if t.startswith(upward)], module


def test_argparse_lives_in_cli_only():
    users = [path for path in (SRC / "carecl").rglob("*.py")
             if "import argparse" in path.read_text() and "cli" not in path.relative_to(SRC).parts]
    assert users == []


def test_a_method_is_one_file_found_by_name(tmp_path, monkeypatch):
    """Registering needs only the method's own module: the registry imports its package's modules on lookup."""
    from carecl.registry import DiscoveringRegistry

    package = tmp_path / "toy_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(
        "from toy_methods import REGISTRY\n"
        "REGISTRY.add('toy', 'the toy entry')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = DiscoveringRegistry("method", "toy_methods")
    import toy_methods

    toy_methods.REGISTRY = registry
    assert registry.get("toy") == "the toy entry"
    assert registry.names() == ["toy"]


def test_every_shipped_method_registers_options_and_learner():
    from carecl.config import MethodConfig
    from carecl.methods.base import Method
    from carecl.registry import METHODS

    assert {"care", "simplecil", "linear_probe"} <= set(METHODS.names())
    for name in METHODS.names():
        entry = METHODS.get(name)
        assert issubclass(entry.options, MethodConfig) and entry.options.name == name
        assert issubclass(entry.method, Method)


def test_no_script_shadows_a_standard_library_module():
    # Scripts put their own folder first on sys.path: a `profile.py` there breaks torch's `import cProfile`.
    import sys

    scripts = [*Path(__file__).resolve().parents[1].glob("benchmarks/**/*.py"),
               *Path(__file__).resolve().parents[1].glob("scripts/*.py")]
    assert scripts
    assert [path.name for path in scripts if path.stem in sys.stdlib_module_names] == []


def test_tuners_import_only_downward():
    """Injectors sit just above config: they import config (and errors, registry) and each other, nothing higher."""
    graph = import_graph()
    allowed = {"carecl.config", "carecl.errors", "carecl.registry"}
    for module in (m for m in graph if m.startswith("carecl.tuners")):
        upward = sorted(t for t in graph[module] if t not in allowed and not t.startswith("carecl.tuners"))
        assert upward == [], f"{module} imports {upward}"


def test_the_command_line_parser_loads_no_torch():
    """`carecl --help` answers at once: building every command's parser imports neither torch nor a method."""
    import subprocess
    import sys

    probe = ("import sys; from carecl.cli.main import build_parser; build_parser(); "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('carecl.methods', 'carecl.data'))))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
