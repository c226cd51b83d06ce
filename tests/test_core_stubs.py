"""python/kvserve/_core.pyi matches the binding: the same names both ways, and mypy's
stubtest agrees on every signature."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import kvserve
import kvserve.errors
from kvserve import _core

STUB = Path(kvserve.__file__).parent / "_core.pyi"


def _public(names: object) -> set[str]:
    return {n for n in names if not n.startswith("_")}  # type: ignore[attr-defined]


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level public names of the stub, and each class's public members."""
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
    return _public(top), {k: _public(v) for k, v in members.items()}


def test_stub_names_match_the_binding_both_ways() -> None:
    top, members = _stub_names()
    assert top == _public(vars(_core))
    for name in top:
        runtime = getattr(_core, name)
        if inspect.isclass(runtime) and not issubclass(runtime, BaseException):
            assert members[name] == _public(dir(runtime)), name


def test_errors_module_re_exports_every_core_exception() -> None:
    core_errors = {
        n
        for n in _public(vars(_core))
        if inspect.isclass(getattr(_core, n)) and issubclass(getattr(_core, n), BaseException)
    }
    assert set(kvserve.errors.__all__) == core_errors
    for name in core_errors:
        assert getattr(kvserve.errors, name) is getattr(_core, name)


def test_stubtest_agrees(tmp_path: Path) -> None:
    # run outside the package: from site-packages (a wheel install) mypy would take every
    # module there for the user's own. It finds kvserve as installed (py.typed, or the
    # editable install's .pth)
    config = tmp_path / "mypy.ini"  # no project config: stubtest's own defaults
    config.write_text("[mypy]\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kvserve._core", "--mypy-config-file", str(config)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"MYPY_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
