"""The package's layers point one way: the runtime (runtime/, hf/, drafter/, perf/ and the
modules they share: models/, drafters/, errors, devices, paths) imports nothing from the
applications built on it (bench, serve, train, data, commands, cli, export, demo). Every
module's imports are read with `ast`, relative imports resolved and imports inside
functions included, so a lazy import cannot hide an upward dependency."""

import ast
from pathlib import Path

import specflash

PACKAGE_ROOT = Path(specflash.__file__).parent
RUNTIME = {"runtime", "hf", "drafter", "perf", "models", "drafters", "errors", "devices", "paths"}
APPLICATIONS = {"bench", "serve", "train", "data", "commands", "cli", "export", "demo"}


def module_name(path: Path, root: Path) -> str:
    """specflash/hf/target.py -> 'specflash.hf.target' (a package's __init__ -> the package)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file; `from X import y` also counts
    X.y, which is what it imports when y is a submodule."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str, root: Path) -> str | None:
    """The top-level part of the package a module belongs to ('hf', 'bench', ...)."""
    parts = module.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    return parts[1]


def upward_imports(root: Path) -> tuple[list[str], list[str]]:
    """(runtime modules checked, 'module:line imports target' for each import that points up)."""
    checked, violations = [], []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if layer_of(module, root) not in RUNTIME:
            continue
        checked.append(module)
        for line, target in imported_modules(path, root):
            if layer_of(target, root) in APPLICATIONS:
                violations.append(f"{module}:{line} imports {target}")
    return checked, sorted(set(violations))


def test_the_runtime_imports_nothing_from_the_applications():
    checked, violations = upward_imports(PACKAGE_ROOT)
    assert len(checked) >= 30, f"only {len(checked)} runtime modules found: is the walk looking in the right place?"
    assert not violations, "imports that point from the runtime up to an application:\n" + "\n".join(violations)


def test_every_part_of_the_package_is_placed_in_a_layer():
    """A new top-level module or package must be declared runtime or application here."""
    parts = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE_ROOT.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert parts - RUNTIME - APPLICATIONS == set()
    assert not RUNTIME & APPLICATIONS


def test_the_walk_finds_relative_absolute_and_lazy_upward_imports(tmp_path):
    root = tmp_path / "specflash"
    for folder, source in {
        "runtime/loop.py": "from ..bench import report\n",
        "hf/adapter.py": "def load():\n    from specflash.serve.app import create_app\n",
        "perf/cost.py": "import specflash.train.loop\nfrom .. import cli\n",
        "drafter/ok.py": "from ..errors import InputError\nfrom ..hf import adapter\n",
        "bench/report.py": "from ..runtime import loop\n",  # downward: allowed
    }.items():
        path = root / folder
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source)
    (root / "__init__.py").touch()
    checked, violations = upward_imports(root)
    assert "specflash.drafter.ok" in checked and "specflash.bench.report" not in checked
    assert violations == ["specflash.hf.adapter:2 imports specflash.serve.app",
                          "specflash.hf.adapter:2 imports specflash.serve.app.create_app",
                          "specflash.perf.cost:1 imports specflash.train.loop",
                          "specflash.perf.cost:2 imports specflash.cli",
                          "specflash.runtime.loop:1 imports specflash.bench",
                          "specflash.runtime.loop:1 imports specflash.bench.report"]
