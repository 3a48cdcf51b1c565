"""Architecture checks: import layers (import-linter), the installed namespace, module sizes.

The layer contracts live in pyproject.toml's ``[tool.importlinter]`` and are checked by
import-linter's ``lint-imports``, run here as a subprocess. One wrinkle: the packages are
installed with a setuptools package-dir mapping (``condgen.models`` is the folder
``models/``), which grimp, import-linter's graph builder, cannot follow: it walks the
directory of ``condgen`` only. So the check runs against a *view*: a temporary
``condgen/`` whose entries are symlinks to the mapped folders (read from pyproject), put
first on ``PYTHONPATH``. The same view is how to run the linter by hand::

    .venv/bin/python tests/test_layers.py        # builds the view, runs lint-imports, prints its report
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# Source folders of the installed namespace and the other first-party code that imports it.
SOURCE_DIRS = ("condgen", "models", "tasks", "flows", "serving")
IMPORTING_DIRS = (*SOURCE_DIRS, "tests", "benchmarks")
BARE_NAMES = {"models", "tasks", "flows", "serving"}
MAX_LINES = 420


def _setuptools() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]


def package_dirs() -> dict[str, Path]:
    """{"condgen": ROOT/condgen, "condgen.models": ROOT/models, ...} from [tool.setuptools.package-dir]."""
    return {name: ROOT / folder for name, folder in _setuptools()["package-dir"].items()}


def build_view(into: Path) -> Path:
    """A ``condgen/`` package under ``into`` whose entries link to the mapped folders, so that a
    directory walk from ``condgen`` (grimp's) sees every ``condgen.*`` module under its installed name."""
    mapping = package_dirs()
    pkg = into / "condgen"
    pkg.mkdir(parents=True)
    for entry in mapping["condgen"].iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name == "condgen":
            continue
        parts = name.split(".")
        assert parts[0] == "condgen" and len(parts) == 2, f"only condgen.<name> mappings are supported: {name}"
        link = pkg / parts[1]
        assert not link.exists(), f"{name}: condgen/{parts[1]} exists in the repository too"
        link.symlink_to(folder, target_is_directory=True)
    return into


def run_lint_imports(view: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the view (cwd and PYTHONPATH: the view, config: the repo's pyproject)."""
    # The console script's own code, run by this interpreter (wherever its lint-imports script lives).
    main = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    cmd = [sys.executable, "-c", main, "--no-cache", "--no-logo", *extra, str(PYPROJECT)]
    env = {**os.environ, "PYTHONPATH": str(view)}
    return subprocess.run(cmd, check=False, cwd=view, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_view(tmp_path_factory.mktemp("layers-view"))


def test_import_contracts_are_kept(view):
    """Every [tool.importlinter] contract: layers CLI -> flows | serving -> tasks -> models, models/ free of
    engines and higher layers, no Prefect in tasks/, no import cycles inside tasks/."""
    result = run_lint_imports(view)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (rc={result.returncode}):\n{report}"
    assert "0 broken" in report, report
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    for contract in contracts:  # each one ran (an unknown or skipped contract would not be listed as KEPT)
        assert f"{contract['name']} KEPT" in report, (contract["name"], report)


def test_the_view_holds_every_module_under_its_installed_name(view):
    """Guards the check above: a layer missing from the view would make its contracts vacuous."""
    mapping = package_dirs()
    seen = {p.relative_to(view / "condgen").with_suffix("") for p in _walk_py(view / "condgen")}
    for name, folder in mapping.items():
        sub = Path(*name.split(".")[1:])
        modules = [py for py in folder.rglob("*.py") if "__pycache__" not in py.parts]
        assert modules, name
        for py in modules:
            assert sub / py.relative_to(folder).with_suffix("") in seen, (name, py)


def _walk_py(top: Path):
    for dirpath, _, files in os.walk(top, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                yield Path(dirpath) / f


def test_no_import_cycles_between_modules_of_tasks(view):
    """Module-level strongly connected components of the import graph inside condgen.tasks (the
    acyclic_siblings contract compares siblings; this also catches a package's __init__ in a cycle)."""
    code = (
        "import grimp, json\n"
        "g = grimp.build_graph('condgen', cache_dir=None)\n"
        "mods = sorted(m for m in g.modules if m == 'condgen.tasks' or m.startswith('condgen.tasks.'))\n"
        "edges = {m: sorted(i for i in g.find_modules_directly_imported_by(m) if i in set(mods)) for m in mods}\n"
        "print(json.dumps(edges))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=view,
                         env={**os.environ, "PYTHONPATH": str(view)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    edges = json.loads(out.stdout)
    assert "condgen.tasks.io.checkpoint" in edges, sorted(edges)  # the graph did see tasks/
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1 or c[0] in edges[c[0]]]
    assert not cycles, f"import cycles inside condgen.tasks: {cycles}"


def _strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root, targets in edges.items():
        if root in index:
            continue
        work = [(root, iter(targets))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def _python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _bare_imports(path: Path) -> list[str]:
    """Imports of a bare top-level models / tasks / flows / serving (statements, or strings given to
    importlib.import_module / __import__ / mock.patch / monkeypatch.setattr)."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in {"import_module", "__import__", "patch", "setattr", "delattr"}:
                names = [node.args[0].value]
        for name in names:
            if name.split(".")[0] in BARE_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return found


def test_first_party_code_imports_only_the_condgen_namespace():
    """``import condgen.tasks...``, never a bare ``tasks`` that works only from the repository root."""
    files = _python_files(*IMPORTING_DIRS)
    assert len(files) > 50
    bad = [hit for path in files for hit in _bare_imports(path)]
    assert not bad, "bare top-level imports (use condgen.<package>):\n" + "\n".join(bad)


def test_setuptools_packages_list_every_package_folder():
    """pyproject's explicit [tool.setuptools] packages = every folder with an __init__.py, under its
    condgen.* name; a package missing there would be absent from the wheel (not from the editable install)."""
    listed = set(_setuptools()["packages"])
    on_disk = set()
    for name, folder in package_dirs().items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk - listed == set(), f"package folders missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"[tool.setuptools] packages without a folder: {sorted(listed - on_disk)}"


def _long_files() -> list[str]:
    out = []
    for path in _python_files(*SOURCE_DIRS):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(ROOT)}: {n} lines")
    return out


def test_no_source_file_is_over_the_line_limit():
    long = _long_files()
    assert not long, f"source files over {MAX_LINES} lines (split them):\n" + "\n".join(long)


if __name__ == "__main__":  # run the import linter by hand, with its full report
    with tempfile.TemporaryDirectory() as tmp:
        res = run_lint_imports(build_view(Path(tmp)), *sys.argv[1:])
        print(res.stdout + res.stderr)
        sys.exit(res.returncode)
