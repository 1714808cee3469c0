r"""Adapters from other libraries' models and batches to Captum's inputs.

Each adapter lives in its own submodule and imports its library only when that submodule
is imported, so importing :mod:`captum_gim` (or this package) never imports PyHealth or
Hugging Face ``transformers``. Use the public modules: :mod:`captum_gim.pyhealth`, ...
"""
