"""Scale analysis: the rule registry (``registry.py``), the rules (``rules.py``) and their
propagation over a graph (``propagate.py``). A new op means one :func:`register` call."""
from .registry import register

__all__ = ["register"]
