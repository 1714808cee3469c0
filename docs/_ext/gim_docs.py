r"""Pages of the captum-gim docs that are generated at build time, never typed by hand.

On ``builder-inited`` this extension writes, under ``docs/_generated/`` (ignored by git):

- ``api/<module>.rst`` and ``api_toc.inc``: one API page per public module of
  ``captum_gim``, listing every name in the module's ``__all__`` (a name re-exported
  from an earlier page links there instead of being documented twice). Modules that need
  an optional package that is not installed get a page that says so.
- ``support_matrix.inc``: the Hugging Face support matrix, from
  ``captum_gim.rules.transformers.SUPPORT_MATRIX``.
- ``hf_helpers.inc``: the names of ``captum_gim.adapters.transformers`` (the paper-setting
  helper).
- ``cli_help.inc``: ``captum-gim --help`` and the help of each subcommand.
- ``results.inc``: the comparison results, from the output of
  ``captum-gim compare --out docs/results`` (``report.json``, ``table.txt``, the PNG
  plots, ``report.html``) and an optional ``docs/results/notes.rst``; or a "not yet
  generated" note. The command's own files are also copied to ``extra/comparison/``,
  served as ``comparison/`` in the HTML output.
- ``tutorials/<name>.rst`` and ``tutorials_toc.inc``: one page per tutorial script in
  ``tutorials/`` (jupytext percent format), with its full source.

It also lets docstring examples written as ``Examples::`` blocks run under
``sphinx-build -b doctest`` (they become napoleon ``Examples:`` sections, whose ``>>>``
lines are doctest blocks), and gives every API page a hidden ``testsetup`` that imports
its module's names, as the docstrings' examples assume.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
PACKAGE = ROOT / "captum_gim"
GENERATED = DOCS / "_generated"
RESULTS = DOCS / "results"
#: copied as is into the HTML output (``html_extra_path`` in conf.py)
EXTRA = GENERATED / "extra"
TUTORIALS = ROOT / "tutorials"

#: Public modules in the order the API reference shows them, with the optional package
#: each one needs. Public modules not listed here are found and appended.
API_MODULES: Sequence[Tuple[str, Optional[str]]] = (
    ("captum_gim", None),
    ("captum_gim.ops", None),
    ("captum_gim.registry", None),
    ("captum_gim.scope", None),
    ("captum_gim.config", None),
    ("captum_gim.rules", None),
    ("captum_gim.rules.torch_nn", None),
    ("captum_gim.rules.transformers", "transformers"),
    ("captum_gim.adapters.transformers", "transformers"),
    ("captum_gim.pyhealth", "pyhealth"),
    ("captum_gim.rules.pyhealth", "pyhealth"),
    ("captum_gim.viz", None),
    ("captum_gim.cli", None),
)
#: Implementation modules whose public names are re-exported by a module above.
_INTERNAL = {
    "captum_gim.attr",
    "captum_gim.attr.gim",
    "captum_gim.attr.layer_gim",
    "captum_gim.adapters",
    "captum_gim.adapters.pyhealth",
}
#: API pages listed under their own heading, after the public API.
_INTERNALS_PREFIX = "captum_gim.evaluation"
#: Optional packages a module under these prefixes needs, for discovered modules.
_NEEDS_BY_PREFIX = (("pyhealth", "pyhealth"), ("transformers", "transformers"))


# --------------------------------------------------------------------------- helpers


def _write(path: Path, text: str) -> None:
    """Write only when the content changed, so Sphinx does not re-read unchanged pages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def _title(text: str, char: str = "=") -> str:
    return f"{text}\n{char * len(text)}\n"


def _module_file(name: str) -> Optional[Path]:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _installed(package: Optional[str]) -> bool:
    return package is None or importlib.util.find_spec(package) is not None


def _write_toc(section: str, names: Sequence[str]) -> None:
    """Remove the stale pages of ``_generated/<section>/`` and write ``<section>_toc.inc``."""
    for stale in (GENERATED / section).glob("*.rst"):
        if stale.stem not in names:
            stale.unlink()
    _write(
        GENERATED / f"{section}_toc.inc",
        ".. toctree::\n   :maxdepth: 1\n\n"
        + "".join(f"   _generated/{section}/{n}\n" for n in names),
    )


def _not_installed_note(need: str, what: str) -> str:
    return (
        f".. note::\n\n   {what} needs ``{need}``, which is not installed in the environment "
        f"these docs were built in (``pip install captum-gim[{need}]``).\n"
    )


def _public_modules() -> List[Tuple[str, Optional[str]]]:
    """The curated modules, then any other public module found in the source tree."""
    mods = [(m, need) for m, need in API_MODULES if _module_file(m) is not None]
    known = {m for m, _ in mods} | _INTERNAL
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[-1] == "__main__":
            continue
        name = ".".join(parts)
        if name in known:
            continue
        need = next((pkg for key, pkg in _NEEDS_BY_PREFIX if key in parts), None)
        found.append((name, need))
    return mods + found


# --------------------------------------------------------------------------- API pages


def _attr_docs(modname: str) -> Dict[str, List[str]]:
    """``#:`` doc comments (and docstrings after assignments) of a module's variables."""
    from sphinx.pycode import ModuleAnalyzer

    try:
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # no source available
        return {}
    return {name: list(lines) for (scope, name), lines in docs.items() if scope == ""}


def _defining_comment(
    name: str, obj: Any, attr_docs: Dict[str, Dict[str, List[str]]]
) -> Optional[List[str]]:
    for other, mod in list(sys.modules.items()):
        if not other.startswith("captum_gim") or getattr(mod, name, None) is not obj:
            continue
        if other not in attr_docs:
            attr_docs[other] = _attr_docs(other)
        if name in attr_docs[other]:
            return [line for line in attr_docs[other][name] if line.strip()]
    return None


def _describe_rules(obj: Any) -> Optional[List[str]]:
    """A description of a :class:`captum_gim.Rule` (or a sequence of them) from its fields."""
    from captum_gim import Rule

    def one(rule: Any) -> str:
        what = ", ".join(f"``{t.__module__}.{t.__qualname__}``" for t in rule.types)
        if rule.predicate is not None:
            what = (what + " and modules its predicate accepts") if what else "modules its predicate accepts"
        text = f"The rule ``{rule.name}`` (kind ``{rule.kind}``), matching {what}."
        if rule.note:
            text += " " + " ".join(rule.note.split())
        return text

    if isinstance(obj, Rule):
        return [one(obj)]
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(r, Rule) for r in obj):
        return ["The rules this module registers, highest precedence first:", ""] + [
            "- " + one(r) for r in obj
        ]
    return None


def _directive(obj: Any) -> Tuple[str, List[str]]:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "autoexception", []
        return "autoclass", [":members:", ":show-inheritance:"]
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "autofunction", []
    return "autodata", [":no-value:"]


def _shared(obj: Any) -> bool:
    """Whether a second name for ``obj`` is the same object (a link, not a new entry)."""
    return not isinstance(obj, (str, int, float, bool, type(None)))


#: Public variables with no doc comment, found while generating (reported by the build).
UNDOCUMENTED: List[str] = []


def _api_pages() -> List[str]:
    pages: List[str] = []
    attr_docs: Dict[str, Dict[str, List[str]]] = {}
    UNDOCUMENTED.clear()
    documented: Dict[int, str] = {}  # id(obj) -> qualified name of its documentation
    for modname, need in _public_modules():
        path = GENERATED / "api" / f"{modname}.rst"
        pages.append(modname)
        if not _installed(need):
            _write(
                path,
                _title(f"``{modname}``")
                + f"\n.. py:module:: {modname}\n\n"
                + _not_installed_note(need, "This module"),
            )
            continue
        module = importlib.import_module(modname)  # an import error fails the build
        names = list(getattr(module, "__all__", []))
        attr_docs[modname] = _attr_docs(modname)
        lines = [
            _title(f"``{modname}``"),
            ".. testsetup:: *\n",
            "   import torch",
            f"   from {modname} import *\n" if names else "",
            f".. automodule:: {modname}",
            "   :no-members:\n" if hasattr(module, "__all__") else "   :members:\n",
        ]
        seen_here = []
        for name in names:
            if name == "__version__":
                lines.append(f".. py:data:: __version__\n   :module: {modname}\n\n   The installed version, "
                             f"``{getattr(module, name)}`` when these docs were built.\n")
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                seen_here.append(f"- ``{name}``: the module :py:mod:`{obj.__name__}`")
                continue
            key = id(obj)
            if key in documented and _shared(obj):
                seen_here.append(f"- ``{name}``: see :py:obj:`{documented[key]}`")
                continue
            directive, options = _directive(obj)
            if directive == "autodata" and name not in attr_docs.get(modname, {}):
                # autodoc would show the docstring of the value's type (e.g. dict's); use
                # the doc comment where the variable is defined, if it is re-exported
                comment = _defining_comment(name, obj, attr_docs) or _describe_rules(obj)
                if comment is None:
                    UNDOCUMENTED.append(f"{modname}.{name}")
                lines.append(f".. py:data:: {name}")
                lines.append(f"   :module: {modname}")
                lines.append(f"   :type: {type(obj).__name__}\n")
                lines.extend("   " + c for c in (comment or ["(No description in the source.)"]))
                lines.append("")
            else:
                lines.append(f".. {directive}:: {modname}.{name}")
                lines.extend(f"   {o}" for o in options)
                lines.append("")
            if _shared(obj):
                documented[key] = f"{modname}.{name}"
        if seen_here:
            lines.append(".. rubric:: Also available here\n")
            lines.extend(seen_here)
            lines.append("")
        _write(path, "\n".join(lines))
    _write_toc("api", pages)
    # the public API first; the comparison command's internals under their own heading
    internal = [p for p in pages if p.startswith(_INTERNALS_PREFIX)]
    public = [p for p in pages if p not in internal]
    toc = ".. toctree::\n   :maxdepth: 1\n\n" + "".join(f"   _generated/api/{n}\n" for n in public)
    if internal:
        toc += (
            "\nInternals of ``captum-gim compare``\n"
            "-----------------------------------\n\n"
            "The modules behind the comparison command (tasks, metrics, reports). They are "
            "documented for contributors and may change between releases; "
            ":py:func:`captum_gim.compare` (see :doc:`/compare_api`) is the stable entry point.\n\n"
            ".. toctree::\n   :maxdepth: 1\n\n"
            + "".join(f"   _generated/api/{n}\n" for n in internal)
        )
    _write(GENERATED / "api_toc.inc", toc)
    return pages


# --------------------------------------------------------------------------- support matrix


def _cell(text: str) -> str:
    return " ".join(str(text).split()) or " "


def support_matrix_rst() -> str:
    r"""The Hugging Face support matrix as reStructuredText, from the rules module's data."""
    modname = "captum_gim.rules.transformers"
    if not _installed("transformers"):
        return _not_installed_note("transformers", "The Hugging Face support matrix")
    import transformers

    matrix = importlib.import_module(modname).SUPPORT_MATRIX

    dtypes: List[str] = []
    impls_all: List[str] = []
    for impls in matrix.values():
        for impl, per_dtype in impls.items():
            if impl not in impls_all:
                impls_all.append(impl)
            for dt in per_dtype:
                if dt not in dtypes:
                    dtypes.append(dt)
    reasons: List[str] = []

    def ref(status: str) -> str:
        status = _cell(status)
        if status not in reasons:
            reasons.append(status)
        return f"[{reasons.index(status) + 1}]"

    def cell(per_dtype: Optional[Dict[str, str]]) -> str:
        if not per_dtype:
            return "not listed"
        ok = [dt for dt in dtypes if _cell(per_dtype.get(dt, "")) == "supported"]
        bad = {dt: _cell(per_dtype[dt]) for dt in dtypes if dt in per_dtype and dt not in ok}
        if len(ok) == len(dtypes):
            return "yes"
        if not ok and len(set(bad.values())) == 1 and len(bad) == len(dtypes):
            return "no " + ref(next(iter(bad.values())))
        parts = [", ".join(ok)] if ok else []
        parts += [f"not {dt} {ref(why)}" for dt, why in bad.items()]
        parts += [f"{dt} untested" for dt in dtypes if dt not in per_dtype]
        return "; ".join(parts)

    out = [
        f"Generated from :py:data:`{modname}.SUPPORT_MATRIX` with transformers "
        f"{transformers.__version__}"
        + f". \"yes\": supported in {', '.join(dtypes)}; \"no\": the note says why; "
        "\"not listed\": not in the matrix.\n",
        ".. list-table::",
        "   :header-rows: 1",
        "   :class: support-matrix\n",
    ]
    rows = [["Family", *[f"``{i}``" for i in impls_all]]]
    rows += [[f"``{family}``", *[cell(impls.get(i)) for i in impls_all]]
             for family, impls in matrix.items()]
    for row in rows:
        out.append("   * - " + row[0])
        out.extend("     - " + c for c in row[1:])
    out.append("")
    if reasons:
        out.append(".. rubric:: Why not\n")
        out.extend(f"{i}. {r}" for i, r in enumerate(reasons, 1))
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- tested versions

SUPPORT_JSON = DOCS / "support" / "matrix.json"
_VERSION_COLUMNS = (("python", "Python"), ("torch", "torch"), ("captum", "Captum"),
                    ("transformers", "transformers"), ("pyhealth", "pyhealth"))


def _vkey(v: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def support_versions_rst() -> str:
    r"""The tested versions (``make test-matrix``), from the committed docs/support/matrix.json.

    One row per cell of the matrix (its versions, the groups of tests it ran, the result and
    its time), then the range each package was tested over.
    """
    if not SUPPORT_JSON.exists():
        return ".. note:: The version matrix has not been run yet (``make test-matrix``).\n"
    data = json.loads(SUPPORT_JSON.read_text())
    cells = [data["cells"][n] for n in data.get("order", sorted(data["cells"]))]
    rows = [["Cell", *[title for _, title in _VERSION_COLUMNS], "Tests", "Result", "Minutes"]]
    for r in cells:
        v = r.get("versions", {})
        if r.get("status") == "not run":
            result, minutes = "not run", "-"
        else:
            result = f"{r['status']}: {r['passed']} passed"
            if r["failed"] + r["errors"]:
                result += f", {r['failed'] + r['errors']} failed"
            if r["skipped"]:
                result += f", {r['skipped']} skipped"
            minutes = f"{(r.get('install_s', 0) + r.get('test_s', 0)) / 60:.1f}"
        rows.append([f"``{r['cell']}``", *[v.get(k, "-") for k, _ in _VERSION_COLUMNS],
                     ", ".join(r["groups"]), result, minutes])
    ran = [r for r in cells if r.get("versions")]
    ranges = []
    for key, title in _VERSION_COLUMNS:
        seen = sorted({r["versions"][key] for r in ran if key in r["versions"]}, key=_vkey)
        if seen:
            ranges.append(f"{title} {seen[0]}" + (f" to {seen[-1]}" if len(seen) > 1 else ""))
    provenance = f"commit ``{data.get('commit') or '?'}``"
    if data.get("uncommitted"):
        provenance += " with uncommitted changes to " + ", ".join(
            f"``{f}``" for f in data["uncommitted"])
    out = [
        f"Tested: {'; '.join(ranges)}.",
        "",
        f"Generated from ``docs/support/matrix.json``, written by ``make test-matrix`` on "
        f"{data.get('date', '?')} ({data.get('platform', '?')}; {provenance}; "
        f"{data.get('seconds', 0) / 60:.0f} minutes of cells). \"core\": the Captum "
        "contract, ops, scope, torch.nn rules and references, plots, the comparison API; "
        "\"hf\": every Hugging Face test (families, eager = SDPA, textbook references, "
        "attention scaling, private names); \"pyhealth\": the PyHealth tests. Floor cells "
        "install ``setup.cfg``'s requirements at their lowest versions.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :class: support-versions",
        "",
    ]
    for row in rows:
        out.append("   * - " + _cell(row[0]))
        out.extend("     - " + _cell(c) for c in row[1:])
    return "\n".join(out) + "\n"


def hf_helpers_rst() -> str:
    modname = "captum_gim.adapters.transformers"
    if not _installed("transformers"):
        return _not_installed_note("transformers", f"``{modname}``")
    module = importlib.import_module(modname)
    names = [n for n in getattr(module, "__all__", []) if not n.startswith("_")]
    lines = [f"The helpers in :py:mod:`{modname}`:\n"]
    for n in names:
        doc = inspect.getdoc(getattr(module, n)) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
        lines.append(f"- :py:obj:`{modname}.{n}`" + (f": {first}" if first else ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI help


def cli_help_rst() -> str:
    import argparse

    from captum_gim.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"
    try:
        parser = build_parser()
        parser.prog = "captum-gim"
        blocks = [("captum-gim --help", parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    blocks.append((f"captum-gim {name} --help", sub.format_help()))
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    out = []
    for cmd, text in blocks:
        out.append(f".. code-block:: text\n   :caption: {cmd}\n")
        out.append(textwrap.indent(text.rstrip(), "   ") + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- results


def _publish(folder: Path, site: Path) -> None:
    """Copy the comparison command's own files in ``folder`` to ``site`` (served as is)."""
    site.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.suffix in (".html", ".json", ".png", ".txt"):
            shutil.copyfile(f, site / f.name)


def results_rst() -> str:
    report_path = RESULTS / "report.json"
    notes = RESULTS / "notes.rst"
    shutil.rmtree(EXTRA / "comparison", ignore_errors=True)
    if not report_path.exists():
        return (
            ".. admonition:: Not yet generated\n\n"
            "   No comparison results are part of this build. They are produced by the "
            "comparison command and picked up from ``docs/results/`` on the next build::\n\n"
            "      captum-gim compare --out docs/results\n"
            "      make docs\n\n"
            "   (``docs/results/report.json``, ``table.txt``, the PNG plots and "
            "``report.html``, as the command writes them; optionally "
            "``docs/results/notes.rst`` with commentary, included below the table.)\n"
        )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    lines: List[str] = []
    date = report.get("date") or _dt.datetime.fromtimestamp(
        report_path.stat().st_mtime, _dt.timezone.utc
    ).isoformat(timespec="seconds")
    lines.append(f"- **Command:** ``{report.get('command', 'captum-gim compare')}``")
    lines.append(f"- **Date:** {date}")
    task = report.get("task") or {}
    if task.get("description"):
        lines.append(f"- **Task:** {_cell(task['description'])}")
    if task.get("n_examples") is not None:
        lines.append(f"- **Examples:** {task['n_examples']}")
    versions = report.get("versions") or {}
    if versions:
        shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
        lines.append(f"- **Versions:** {shown}")
    lines.append("")
    table = RESULTS / "table.txt"
    csv = RESULTS / "table.csv"
    notes_text = notes.read_text(encoding="utf-8") if notes.exists() else ""
    if csv.exists() and "table.csv" not in notes_text:
        lines.append(".. csv-table::\n   :file: /results/table.csv\n   :header-rows: 1\n")
    if notes.exists():
        lines.append(".. include:: /results/notes.rst\n")
    if table.exists():
        # with a real table above, the command's text output (per-group means, paired
        # GIM - IG differences) comes after it, as the command prints it
        if csv.exists():
            lines.append(".. rubric:: The command's text output\n")
        lines.append(".. code-block:: text\n")
        lines.append(textwrap.indent(table.read_text(encoding="utf-8").rstrip(), "   "))
        lines.append("")
    plots = (report.get("files") or {}).get("plots") or sorted(
        p.name for p in RESULTS.glob("*.png")
    )
    for name in plots:
        if (RESULTS / name).exists():
            lines.append(f".. figure:: /results/{name}\n   :width: 100%\n")
    # the command's own files, served as they are under comparison/ (see html_extra_path)
    _publish(RESULTS, EXTRA / "comparison")
    links = [f"`{n} <comparison/{n}>`__" for n in ("report.html", "report.json") if (RESULTS / n).exists()]
    if links:
        lines.append("The command's full report: " + ", ".join(links) + ".")
        lines.append("")
    return "\n".join(lines) + "\n"


#: the other targets whose ``captum-gim compare --quick`` output sits in a folder of
#: ``docs/results`` and gets a section of the results page: (folder, section title)
MORE_RESULTS = (
    ("minilm", "Pretrained all-MiniLM-L6-v2 (``--model minilm``)"),
    ("pyhealth", "A PyHealth Transformer on an EHR cohort (``--model pyhealth``)"),
)


def more_results_rst() -> str:
    """One section per folder of :data:`MORE_RESULTS` that holds a report: the command, the
    task, the table, the frontier plot and the command's comparison summary."""
    out: List[str] = []
    for folder, title in MORE_RESULTS:
        path = RESULTS / folder
        if not (path / "report.json").exists():
            continue
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        task = report.get("task") or {}
        out += [title, "-" * len(title), ""]
        out.append(f"- **Command:** ``{report.get('command', 'captum-gim compare')}`` "
                   f"({report.get('wall_seconds_total', 0):.0f} s for the whole run)")
        if task.get("description"):
            out.append(f"- **Task:** {_cell(task['description'])}")
        if task.get("n_examples") is not None:
            out.append(f"- **Examples:** {task['n_examples']}")
        out.append("")
        if (path / "table.csv").exists():
            out += [
                f".. csv-table:: {_cell(title)}: mean ± half-width of the 95% bootstrap CI",
                f"   :file: ../results/{folder}/table.csv",  # relative to _generated/
                "   :header-rows: 1",
                "",
            ]
        if (path / "frontier.png").exists():
            out += [f".. figure:: /results/{folder}/frontier.png", "   :width: 100%", "",
                    "   Each metric against median time and counted passes; dashed: the "
                    "Pareto frontier; the star is GIM.", ""]
        table = path / "table.txt"
        if table.exists():
            text = table.read_text(encoding="utf-8")
            i = text.find("GIM - ")
            if i >= 0:
                out += [".. code-block:: text", ""]
                out.append(textwrap.indent(text[i:].rstrip(), "   "))
                out.append("")
        _publish(path, EXTRA / "comparison" / folder)
        out += [f"The full report: `report.html <comparison/{folder}/report.html>`__, "
                f"`report.json <comparison/{folder}/report.json>`__.", ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- tutorials


def _tutorial_title(text: str, default: str) -> str:
    for line in text.splitlines():
        m = re.match(r"^#\s+#\s+(.+)$", line)  # first markdown heading: "# # Title"
        if m:
            return m.group(1).strip().replace("`", "")
    return default


def tutorials() -> List[str]:
    r"""One notebook page per tutorial script, executed by myst-nb when the docs are built.

    ``_generated/tutorials/<name>.ipynb`` is the jupytext conversion of the script with a
    hidden first cell (``%matplotlib inline``, so figures show on the page whatever
    ``MPLBACKEND`` says) and a note linking the plain notebook, ``_generated/notebooks/
    <name>.ipynb`` (the conversion alone), offered as a download.
    """
    import jupytext
    import nbformat

    names = []
    for path in sorted(TUTORIALS.glob("*.py")):
        names.append(path.stem)
        notebook = jupytext.read(path)
        plain = nbformat.writes(notebook)
        _write(GENERATED / "notebooks" / f"{path.stem}.ipynb", plain)
        page = nbformat.reads(plain, as_version=4)
        setup = nbformat.v4.new_code_cell("%matplotlib inline")
        setup.metadata["tags"] = ["remove-cell"]
        link = nbformat.v4.new_markdown_cell(
            f"Source: `tutorials/{path.name}` (a jupytext percent-format script), executed "
            f"when these docs were built. {{download}}`Download it as a notebook "
            f"<../notebooks/{path.stem}.ipynb>`, or run it with `python tutorials/{path.name}`."
        )
        # after the title cell
        page.cells = page.cells[:1] + [link, setup] + page.cells[1:]
        _write(GENERATED / "tutorials" / f"{path.stem}.ipynb", nbformat.writes(page))
    for stale in (GENERATED / "tutorials").glob("*.rst"):
        stale.unlink()
    for stale in (GENERATED / "tutorials").glob("*.ipynb"):
        if stale.stem not in names:
            stale.unlink()
    _write(
        GENERATED / "tutorials_toc.inc",
        ".. toctree::\n   :maxdepth: 1\n\n"
        + "".join(f"   _generated/tutorials/{n}\n" for n in names),
    )
    return names


# --------------------------------------------------------------------------- Sphinx hooks

_EXAMPLES = re.compile(r"^(\s*)(Examples?)::\s*$")


def _examples_as_sections(app, what, name, obj, options, lines: List[str]) -> None:
    r"""``Examples::`` followed by ``>>>`` lines becomes napoleon's ``Examples:`` section.

    A literal block (``::``) is never run by ``sphinx.ext.doctest``; a napoleon section's
    ``>>>`` lines are doctest blocks, which are. Blocks without ``>>>`` (shell commands)
    stay literal.
    """
    for i, line in enumerate(lines):
        m = _EXAMPLES.match(line)
        if not m:
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and (len(nxt) - len(nxt.lstrip())) <= len(m.group(1)):
                break
            block.append(nxt)
        if any(b.strip().startswith(">>>") for b in block):
            lines[i] = f"{m.group(1)}{m.group(2)}:"


#: the rows and columns of the front page's "at a glance" table (from results/table.csv)
GLANCE_ROWS = ("GIM", "IG(4)", "IG(50)", "IG-GIM(50)", "InputXGradient", "Saliency")
GLANCE_COLUMNS = ("Method", "Comp ↑", "Suff ↓", "GT-AUROC ↑", "ms/ex", "passes")


def glance_rst() -> str:
    """GIM against Integrated Gradients at a glance: a few rows of the committed results
    table (``docs/results/table.csv``, written by ``captum-gim compare``)."""
    import csv

    path = RESULTS / "table.csv"
    if not path.exists():
        return "(No comparison results committed yet: see :doc:`results`.)\n"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = [r for name in GLANCE_ROWS for r in rows if r.get("Method") == name]
    n = ""
    report = RESULTS / "report.json"
    if report.exists():
        n = f" over {json.loads(report.read_text())['task']['n_examples']} examples"
    lines = [
        f".. list-table:: GIM against Integrated Gradients on the embedded default task "
        f"(mean ± half-width of the 95% bootstrap CI{n}; ``captum-gim compare --quick``; "
        "the whole table, the frontier plot and two tasks where GIM loses: :doc:`results`)",
        "   :header-rows: 1",
        "",
    ]
    for row in [dict(zip(GLANCE_COLUMNS, GLANCE_COLUMNS))] + picked:
        cells = [_cell(str(row.get(c, ""))) for c in GLANCE_COLUMNS]
        lines.append("   * - " + cells[0])
        lines.extend("     - " + c for c in cells[1:])
    return "\n".join(lines) + "\n"


def generate(app=None) -> None:
    GENERATED.mkdir(exist_ok=True)
    _api_pages()
    if UNDOCUMENTED:
        from sphinx.util import logging

        logging.getLogger(__name__).info(
            "[gim_docs] public variables without a doc comment: " + ", ".join(UNDOCUMENTED)
        )
    tutorials()
    _write(GENERATED / "support_matrix.inc", support_matrix_rst())
    _write(GENERATED / "hf_helpers.inc", hf_helpers_rst())
    _write(GENERATED / "support_versions.inc", support_versions_rst())
    _write(GENERATED / "cli_help.inc", cli_help_rst())
    _write(GENERATED / "results.inc", results_rst())
    _write(GENERATED / "glance.inc", glance_rst())
    _write(GENERATED / "results_more.inc", more_results_rst())


def setup(app):
    app.connect("builder-inited", generate)
    # before napoleon (priority 500) turns the docstring into reST
    app.connect("autodoc-process-docstring", _examples_as_sections, priority=100)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
