r"""Bridges to other libraries' APIs (each imported on its own, as an optional extra).

- :mod:`captum_gim.integrations.inseq`: GIM as an inseq attribution method (``"gim"``).
"""
