"""The version matrix: ``make test-matrix`` (``nox`` with the ``uv`` backend).

Each cell is one environment (Python, torch, Captum, transformers, pyhealth) and runs the
groups of tests that concern it:

- ``core``: the Captum contract, the ops, the scope, the torch.nn rules and references,
  plotting (matplotlib) and the comparison API (tqdm, numpy);
- ``hf``: every ``tests/test_hf_*.py`` (families, eager == SDPA, textbook references,
  non-default attention scaling, private names, dtypes, padding...);
- ``pyhealth``: every ``tests/test_pyhealth_*.py`` (pyhealth 2.1 needs Python >= 3.12).

The package is installed editable with its extras, from ``setup.cfg``: the *floor* cells
with ``uv pip install --resolution lowest-direct``, which installs exactly the floors that
``setup.cfg`` declares (so the declared floors are what runs); the other cells pin the
versions of their axes next to ``setup.cfg``'s ranges (a pin outside a declared range fails
to resolve). Environments are built by ``uv`` (``venv_backend="uv"``): its cache
(``~/.cache/uv``, or ``UV_CACHE_DIR``) is shared and hard-linked, so each torch wheel and the
CUDA libraries are downloaded once and every other cell only links them; each run builds
fresh environments (a few seconds each from the cache). They live outside the clone, in
``~/.cache/captum-gim/nox`` (``CAPTUM_GIM_NOX_ENVS``). Interpreters come from pyenv
(``python3.X`` on PATH also works); uv downloads none.

Each cell writes ``results/matrix/<cell>.xml`` (JUnit) and ``<cell>.json`` (versions,
counts, seconds); ``nox -s report`` gathers them into ``docs/support/matrix.json``, from
which the docs render the support table (``docs/_ext/gim_docs.py``).

    nox -s cell                       # every cell (what make test-matrix runs), then:
    nox -s report                     # gather the results into docs/support/matrix.json
    nox -s "cell(py310-floor)"        # one cell
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import time
import xml.etree.ElementTree as ET
from typing import Dict, List

import nox

ROOT = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.environ.get("CAPTUM_GIM_MATRIX_RESULTS", os.path.join(ROOT, "results", "matrix"))
MATRIX_JSON = os.path.join(ROOT, "docs", "support", "matrix.json")

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "no"  # fresh environments: exactly what the cell asks for
nox.options.error_on_missing_interpreters = True  # a missing Python fails, never skips
nox.options.envdir = os.environ.get(
    "CAPTUM_GIM_NOX_ENVS",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "captum-gim", "nox"),
)
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # pyenv's interpreters only


def _add_pyenv_interpreters() -> None:
    """Put pyenv's ``bin`` folders on PATH so ``python3.10`` ... ``python3.13`` resolve."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    dirs: List[str] = []
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        cands = sorted(glob.glob(os.path.join(root, "versions", minor + ".*", "bin")), reverse=True)
        dirs += [d for d in cands if os.path.exists(os.path.join(d, "python" + minor))][:1]
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


_add_pyenv_interpreters()

# --- what each group of tests is --------------------------------------------------------

CORE_TESTS = [
    "tests/test_captum_contract.py",
    "tests/test_ops.py",
    "tests/test_layer_gim.py",
    "tests/test_scope_safety.py",
    "tests/test_torch_nn_reference.py",
    "tests/test_properties.py",
    "tests/test_dtypes_devices.py",
    "tests/test_functional_ops.py",
    "tests/test_strict_runtime.py",
    "tests/test_packaging.py",
    "tests/test_viz.py",
    "tests/test_compare_api.py",
]


def _glob(pattern: str) -> List[str]:
    return sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tests", pattern)))


GROUPS = {
    "core": lambda: [f for f in CORE_TESTS if os.path.exists(os.path.join(ROOT, f))],
    "hf": lambda: _glob("test_hf_*.py"),
    "pyhealth": lambda: _glob("test_pyhealth_*.py"),
}
TEST_DEPS = ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis>=6"]

# --- the cells --------------------------------------------------------------------------
# "floor": setup.cfg's requirements at their lowest (uv --resolution lowest-direct): torch
# 2.5.0 (2.6.0 on Python 3.13), Captum 0.8.0 (0.9.0 on 3.13), transformers 4.53.0,
# tokenizers 0.21.0, matplotlib 3.9.2, tqdm 4.60.0. Otherwise the pins below. torch wheels
# are per Python and large (CUDA builds that run on the CPU): torch 2.14.1 on 3.10, 3.12
# and 3.13, torch 2.5.0 on 3.10 and 2.6.0 on 3.13.
TORCH_LATEST = "2.14.1"
TORCHVISION_LATEST = "0.29.1"  # pins torch 2.14.1; pyhealth pulls torchvision
CAPTUM_08 = "0.8.0"
CAPTUM_LATEST = "0.9.0"
TF_LAST_4 = "4.57.6"  # the last 4.x release (the middle of the range)
TF_FIRST_5 = "5.0.0"
TF_LATEST_PY310 = "5.20.2"  # the newest transformers for Python 3.10 (5.21 needs 3.11)
TF_LATEST = "5.23.0"
PYHEALTH = "2.1.0"


def _cell(name: str, python: str, groups: List[str], floor: bool = False, **pins: str) -> Dict:
    extras = ["transformers"] + (["pyhealth"] if "pyhealth" in groups else [])
    return dict(name=name, python=python, groups=groups, floor=floor, extras=extras, pins=pins)


CELLS: List[Dict] = [
    # the floors on the oldest Python, and the newest of everything that Python gets
    _cell("py310-floor", "3.10", ["core", "hf"], floor=True),
    _cell("py310-latest", "3.10", ["core", "hf"],
          torch=TORCH_LATEST, captum=CAPTUM_LATEST, transformers=TF_LATEST_PY310),
    # 3.12: everything, PyHealth included; then transformers across its range
    _cell("py312-all", "3.12", ["core", "hf", "pyhealth"],
          torch=TORCH_LATEST, torchvision=TORCHVISION_LATEST, captum=CAPTUM_LATEST,
          transformers=TF_LATEST, pyhealth=PYHEALTH),
    _cell("py312-tf4-captum08", "3.12", ["core", "hf"],
          torch=TORCH_LATEST, captum=CAPTUM_08, transformers=TF_LAST_4),
    _cell("py312-tf5.0", "3.12", ["hf"],
          torch=TORCH_LATEST, captum=CAPTUM_LATEST, transformers=TF_FIRST_5),
    # 3.13: the floors (torch 2.6, Captum 0.9 there) and the latest
    _cell("py313-floor", "3.13", ["core", "hf"], floor=True),
    _cell("py313-latest", "3.13", ["core", "hf"],
          torch=TORCH_LATEST, captum=CAPTUM_LATEST, transformers=TF_LATEST),
]
CELLS_BY_NAME = {c["name"]: c for c in CELLS}


def _requested(cell: Dict) -> List[str]:
    """What the cell asks uv for (for the record)."""
    pkg = f"-e .[{','.join(cell['extras'])}]"
    if cell["floor"]:
        return ["--resolution lowest-direct", pkg]
    return [pkg] + [f"{k}=={v}" for k, v in cell["pins"].items()]


def _counts(xml_path: str) -> Dict[str, int]:
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    if not os.path.exists(xml_path):
        return counts
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        tests = int(s.get("tests", 0))
        f, e, sk = int(s.get("failures", 0)), int(s.get("errors", 0)), int(s.get("skipped", 0))
        counts["failed"] += f
        counts["errors"] += e
        counts["skipped"] += sk
        counts["passed"] += tests - f - e - sk
    return counts


_VERSIONS = (
    "import json, importlib.metadata as m, platform\n"
    "out = {'python': platform.python_version()}\n"
    "for d in ('torch', 'captum', 'transformers', 'tokenizers', 'pyhealth', 'numpy', 'matplotlib', 'tqdm'):\n"
    "    try: out[d] = m.version(d)\n"
    "    except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))"
)


@nox.session
@nox.parametrize(
    ("python", "cell"), [(c["python"], c["name"]) for c in CELLS], ids=[c["name"] for c in CELLS]
)
def cell(session: nox.Session, cell: str) -> None:
    """One cell of the matrix: its environment, then its groups of tests."""
    spec = CELLS_BY_NAME[cell]
    t0 = time.monotonic()
    pkg = f"{ROOT}[{','.join(spec['extras'])}]"
    if spec["floor"]:
        session.install("--resolution", "lowest-direct", "-e", pkg)
        session.install(*TEST_DEPS)
    else:
        session.install("-e", pkg, *[f"{k}=={v}" for k, v in spec["pins"].items()], *TEST_DEPS)
    versions = json.loads(
        session.run("python", "-c", _VERSIONS, silent=True).strip().splitlines()[-1]
    )
    t1 = time.monotonic()
    tests = [t for g in spec["groups"] for t in GROUPS[g]()]
    os.makedirs(RESULTS, exist_ok=True)
    xml = os.path.join(RESULTS, f"{cell}.xml")
    if os.path.exists(xml):
        os.remove(xml)
    failed = False
    try:
        session.run(
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
            "--timeout=900", f"--junitxml={xml}", *session.posargs, *tests,
            env={
                "PYTHONHASHSEED": "0",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",  # two pytest workers on two cores
            },
        )
    except nox.command.CommandFailed:
        failed = True
    t2 = time.monotonic()
    counts = _counts(xml)
    ok = not failed and counts["failed"] == counts["errors"] == 0 and counts["passed"] > 0
    result = dict(
        cell=cell, groups=spec["groups"], requested=_requested(spec), versions=versions,
        status="passed" if ok else "failed", install_s=round(t1 - t0, 1),
        test_s=round(t2 - t1, 1), **counts,
    )
    with open(os.path.join(RESULTS, f"{cell}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    if not ok:
        session.error(f"cell {cell}: tests failed ({counts})")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return ""


def gather() -> Dict:
    """Every cell's result (``"not run"`` where a cell left none) and where they ran."""
    cells: Dict[str, Dict] = {}
    for c in CELLS:
        path = os.path.join(RESULTS, f"{c['name']}.json")
        if os.path.exists(path):
            with open(path) as fh:
                cells[c["name"]] = json.load(fh)
        else:
            cells[c["name"]] = dict(cell=c["name"], groups=c["groups"], requested=_requested(c),
                                    versions={}, status="not run")
    changed = [ln[3:] for ln in _git("status", "--porcelain", "--", "captum_gim", "tests",
                                     "setup.cfg", "noxfile.py").splitlines()]
    return dict(
        cells=cells,
        order=[c["name"] for c in CELLS],
        platform=f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        commit=_git("rev-parse", "--short", "HEAD").strip(),
        uncommitted=changed,
        date=time.strftime("%Y-%m-%d"),
        seconds=round(sum(r.get("install_s", 0) + r.get("test_s", 0) for r in cells.values()), 1),
    )


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """Gather the cells' results into docs/support/matrix.json (the docs' support table)."""
    matrix = gather()
    os.makedirs(os.path.dirname(MATRIX_JSON), exist_ok=True)
    with open(MATRIX_JSON, "w") as fh:
        json.dump(matrix, fh, indent=1, sort_keys=True)
        fh.write("\n")
    for name in matrix["order"]:
        r = matrix["cells"][name]
        session.log(
            f"{name:20s} {r['status']:8s} "
            + " ".join(f"{k}={r[k]}" for k in ("passed", "failed", "errors", "skipped", "install_s", "test_s") if k in r)
        )
    failed = [n for n, r in matrix["cells"].items() if r["status"] != "passed"]
    if failed:
        session.error(f"cells not passing: {', '.join(failed)}")
