"""The direction data flows in (load -> calibrate -> convert -> export ->
validate), checked on the import statements of every module."""

import ast
from pathlib import Path

import pytest

import factorport

PACKAGE = Path(factorport.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative ones resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            stem = ".".join(p for p in (base, node.module or "") if p)
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)  # `from . import x` imports a module
    return names


def _modules(subpackage: str):
    return sorted((PACKAGE / subpackage).rglob("*.py"))


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("converters", "factorport.formats"),
    ("formats", "factorport.converters"),
    ("llamacpp", "factorport.converters"),
    ("llamacpp", "factorport.formats"),
    ("validators", "factorport.converters"),
])
def test_no_import_against_the_flow(importer, forbidden):
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n == forbidden or n.startswith(forbidden + "."))
                 for p in _modules(importer)}
    assert not {k: v for k, v in offenders.items() if v}


def test_ops_import_nothing_of_ours_and_touch_no_file_or_native_library():
    for path in _modules("ops"):
        imported = _imports(path)
        ours = {n for n in imported if n.startswith("factorport.") and not n.startswith("factorport.ops")}
        assert not ours, (path.name, ours)
        assert not imported & {"ctypes", "tempfile", "llama_cpp", "onnxruntime", "shutil"}, path.name
        calls = {n.func.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls, path.name


def test_the_checker_sees_imports():
    # the rules above would pass vacuously if _imports missed relative imports
    assert "factorport.llamacpp.quantize" in _imports(PACKAGE / "converters" / "llamacpp.py")
    assert "factorport.ops" in _imports(PACKAGE / "formats" / "layout.py")
