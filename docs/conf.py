# Sphinx configuration for captum-gim. Build with `make docs` (HTML with warnings as
# errors, then the doctests), or: python -m sphinx -W --keep-going -b html docs docs/_build/html
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package from this checkout
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import captum_gim  # noqa: E402

project = "captum-gim"
author = "the captum-gim authors"
copyright = "the captum-gim authors"
release = captum_gim.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "gim_docs",
]

exclude_patterns = ["_build", "results/**", "_generated/notebooks/**", "_ext/**", "_scripts/**",
                    "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb"}

# -- tutorials: myst-nb executes the notebooks gim_docs writes from tutorials/*.py ----------
# Cached (jupyter-cache, keyed by the notebook's code) under docs/_build, so a rebuild that
# changes no tutorial executes nothing; a changed tutorial is executed again.
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 300
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
# library chatter on stderr (tqdm's notebook notice) is not tutorial output; test_tutorials
# still fails on GIM's warnings there
nb_output_stderr = "remove"
myst_enable_extensions = ["colon_fence"]
# what the tutorials write goes to the build folder, not the checkout
os.environ.setdefault("CAPTUM_GIM_TUTORIAL_OUT", str(DOCS / "_build" / "tutorial_out"))
root_doc = "index"
templates_path: list = []
default_role = "py:obj"
# Keep "--help" as two hyphens in captions and text (smartquotes would print an en dash).
smartquotes = False
nitpicky = False

# -- autodoc / napoleon -------------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False  # Captum's inherited docstrings are not Google style
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A separate "Return type" field: inline, napoleon wraps the type in emphasis, and a Captum-style
# "*Tensor* or *tuple[Tensor, ...]*" then renders as "**Tensor* or *tuple[Tensor, ...]**".
napoleon_use_rtype = True
napoleon_use_ivar = True  # Attributes sections as fields: no duplicate attribute entries
napoleon_attr_annotations = True

# -- doctest ------------------------------------------------------------------------------
doctest_global_setup = """
import os, tempfile, warnings
os.environ.setdefault("MPLBACKEND", "Agg")
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
_gim_docs_cwd = os.getcwd()
_gim_docs_tmp = tempfile.TemporaryDirectory()
os.chdir(_gim_docs_tmp.name)  # examples that write files write them here
"""
doctest_global_cleanup = """
os.chdir(_gim_docs_cwd)
_gim_docs_tmp.cleanup()
"""
doctest_test_doctest_blocks = "default"

# -- HTML ---------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"captum-gim {release}"
html_static_path = ["_static"]
html_css_files = ["gim.css"]
# docs/_ext/gim_docs.py copies the comparison command's own report (HTML, JSON, plots)
# here, to be served under comparison/; the folder must exist when the config is read.
(DOCS / "_generated" / "extra").mkdir(parents=True, exist_ok=True)
html_extra_path = ["_generated/extra"]
html_show_sourcelink = False

# Library warnings while importing modules for autodoc are not documentation problems.
warnings.filterwarnings("ignore", category=FutureWarning)
