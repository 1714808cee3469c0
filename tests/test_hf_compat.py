"""The versions captum_gim declares, and the private names it relies on (``captum_gim._compat``).

- ``setup.cfg`` declares exactly the floors of ``_compat.FLOORS`` (the ones the test
  matrix's floor cells install and pass), and the installed versions are not below them;
- every private name of transformers, Captum and torch listed in ``_compat.PRIVATE_NAMES``
  still exists in the installed release (each matrix cell runs this, so a release that
  renames one fails here, not silently in an attribution);
- no module of the package uses a private name of another package that is missing from
  the list (read from the source: imports from private modules or of ``_names``, and
  ``obj._attr`` / ``getattr(obj, "_attr")`` on objects that are not captum_gim's own);
- a transformers older than the floor is refused with the reason, and torch.nn rules work.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import pytest
from packaging.requirements import Requirement

from captum_gim import _compat
from captum_gim._compat import FLOORS, PRIVATE_NAMES, version_of, version_tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_gim"
#: private names of the standard library (not a dependency's API)
STDLIB_PRIVATE = {"_getframe"}


def _lower_bounds() -> Dict[str, List[Tuple[str, str]]]:
    """package -> [(lowest version allowed, marker)] of setup.cfg's requirements."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    for extra in ("transformers", "pyhealth"):
        lines += cfg["options.extras_require"][extra].strip().splitlines()
    out: Dict[str, List[Tuple[str, str]]] = {}
    for line in filter(None, (ln.strip() for ln in lines)):
        req = Requirement(line)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line}: one '>=' floor expected"
        out.setdefault(req.name, []).append((lows[0], str(req.marker or "")))
    return out


def test_setup_cfg_declares_the_tested_floors() -> None:
    bounds = _lower_bounds()
    assert set(bounds) == set(FLOORS), (set(bounds), set(FLOORS))
    for package, floor in FLOORS.items():
        lowest = min((b for b, _ in bounds[package]), key=version_tuple)
        assert lowest == floor, (package, bounds[package], floor)
    # Python 3.13: Captum 0.8 pins numpy < 2 (no 3.13 wheels); torch 2.5 cannot compile there
    assert sorted(bounds["captum"]) == [("0.8", 'python_version < "3.13"'), ("0.9", 'python_version >= "3.13"')]
    assert sorted(bounds["torch"]) == [("2.5", 'python_version < "3.13"'), ("2.6", 'python_version >= "3.13"')]


def test_the_rules_say_the_same_floor() -> None:
    from captum_gim.rules import SUPPORTED

    assert SUPPORTED["transformers"] == ">=" + FLOORS["transformers"]


@pytest.mark.parametrize("package", ["torch", "captum", "transformers"])
def test_installed_versions_are_not_below_the_floors(package: str) -> None:
    have = version_of(package)
    if have is None:
        pytest.skip(f"{package} is not installed")
    floor = FLOORS[package]
    if sys.version_info >= (3, 13):
        floor = {"captum": "0.9", "torch": "2.6"}.get(package, floor)
    assert have >= version_tuple(floor)


def test_version_tuple() -> None:
    assert version_tuple("4.57.6") == (4, 57, 6)
    assert version_tuple("2.5.0+cu124") == (2, 5, 0)
    assert version_tuple("5.0.0rc1") == (5, 0, 0)
    assert version_tuple("0.9") == (0, 9)


# --- the private names ---------------------------------------------------------------------


def _resolve(path: str) -> Any:
    head = re.match(r"[A-Za-z_][\w.]*", path).group()  # the dotted name before any call
    parts = head.split(".")
    for i in range(len(parts), 0, -1):  # import the longest importable module prefix
        try:
            importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    top = parts[0]
    return eval(path, {top: sys.modules[top]})  # noqa: S307 - our own constant expressions


def _expected(entry: _compat.PrivateName) -> bool:
    have = version_of(entry.package)
    return (not entry.since or have >= version_tuple(entry.since)) and (
        not entry.until or have < version_tuple(entry.until)
    )


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=[f"{p.package}:{p.name}" for p in PRIVATE_NAMES])
def test_private_name_exists_in_the_installed_release(entry: _compat.PrivateName) -> None:
    if version_of(entry.package) is None:
        pytest.skip(f"{entry.package} is not installed")
    if not _expected(entry):
        pytest.skip(f"{entry.name} is expected in {entry.package} [{entry.since}, {entry.until})")
    obj = _resolve(entry.path)
    if not entry.path.endswith(entry.name):  # set inside a function: its source names it
        assert entry.name in inspect.getsource(obj), (entry.name, entry.path)


def _captum_gim_names() -> Set[str]:
    """Every name captum_gim defines itself (so ``x._name`` may be its own)."""
    names: Set[str] = set()
    for f in PACKAGE.rglob("*.py"):
        names.update(p.removesuffix(".py") for p in f.relative_to(PACKAGE).parts)
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
            elif isinstance(n, ast.alias):
                names.add((n.asname or n.name).split(".")[0])
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    for x in ast.walk(target):
                        if isinstance(x, ast.Name):
                            names.add(x.id)
                        elif (
                            isinstance(x, ast.Attribute)
                            and isinstance(x.value, ast.Name)
                            and x.value.id in ("self", "cls", "ctx")
                        ):
                            names.add(x.attr)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _used_private_names() -> Dict[str, Set[str]]:
    """private name (or ``module.name`` for imports) -> files that use it."""
    own = _captum_gim_names()
    used: Dict[str, Set[str]] = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                if n.module.split(".")[0] in ("captum", "transformers", "torch", "accelerate"):
                    for a in n.names:
                        if any(_private(p) for p in n.module.split(".")) or _private(a.name):
                            used.setdefault(f"{n.module}.{a.name}", set()).add(rel)
            elif isinstance(n, ast.Attribute) and _private(n.attr):
                if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls", "ctx"):
                    continue
                if n.attr not in own:
                    used.setdefault(n.attr, set()).add(rel)
            elif isinstance(n, ast.Call) and n.args[1:2]:
                fn = n.func
                is_attr_call = (isinstance(fn, ast.Name) and fn.id in ("getattr", "hasattr", "setattr")) or (
                    isinstance(fn, ast.Attribute) and fn.attr == "__setattr__"
                )
                arg = n.args[1]
                if (
                    is_attr_call
                    and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and _private(arg.value)
                    and arg.value not in own
                ):
                    used.setdefault(arg.value, set()).add(rel)
    return used


def test_every_private_name_used_is_listed() -> None:
    listed_paths = {p.path for p in PRIVATE_NAMES}
    listed_names = {p.name for p in PRIVATE_NAMES}
    missing = {
        name: files
        for name, files in _used_private_names().items()
        if name not in listed_paths and name.rpartition(".")[2] not in listed_names
        and name not in STDLIB_PRIVATE
    }
    assert not missing, f"private names used but not listed in captum_gim._compat.PRIVATE_NAMES: {missing}"


def test_the_scan_finds_what_it_should() -> None:
    """The source scan sees the private names we know are used (so it is not vacuous)."""
    used = _used_private_names()
    assert "_attn_implementation" in used
    assert "captum._utils.common._format_output" in used
    assert "_experts_implementation" in used  # a getattr string


# --- an unusable transformers ----------------------------------------------------------------


def test_a_transformers_below_the_floor_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(_compat, "version_of", lambda p: (4, 48, 3) if p == "transformers" else None)
    msg = _compat.transformers_problem()
    assert msg is not None and "4.48.3" in msg and FLOORS["transformers"] in msg
    monkeypatch.setattr(_compat, "version_of", lambda p: version_tuple(FLOORS["transformers"]))
    assert _compat.transformers_problem() is None


def test_legacy_attention_only_on_transformers_4(monkeypatch) -> None:
    monkeypatch.setattr(_compat, "version_of", lambda p: (4, 57, 6))
    assert _compat.legacy_hf_attention()
    monkeypatch.setattr(_compat, "version_of", lambda p: (5, 0, 0))
    assert not _compat.legacy_hf_attention()
    monkeypatch.setattr(_compat, "version_of", lambda p: None)
    assert not _compat.legacy_hf_attention()


def test_legacy_classes_exist_where_the_rule_expects_them() -> None:
    transformers = pytest.importorskip("transformers")
    from captum_gim.rules.transformers.support import LEGACY_ATTENTION_CLASSES

    found = {}
    for m in ("bert", "roberta", "qwen2_moe"):
        module = importlib.import_module(f"transformers.models.{m}.modeling_{m}")
        found.update({n: getattr(module, n) for n in LEGACY_ATTENTION_CLASSES if hasattr(module, n)})
    if _compat.legacy_hf_attention():  # each there, computing attention itself
        assert set(found) == set(LEGACY_ATTENTION_CLASSES), transformers.__version__
        for cls in found.values():
            assert "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(cls.forward)
    else:  # transformers 5: what is left of these names goes through AttentionInterface
        for cls in found.values():
            assert "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward), cls
