r"""``python -m captum_gim``: the ``captum-gim`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
