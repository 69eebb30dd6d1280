"""``python -m unitscale_fx``: the ``unitscale-fx`` command line (see :mod:`unitscale_fx.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
