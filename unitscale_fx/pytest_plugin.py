"""pytest plugin of unitscale_fx (registered through the ``pytest11`` entry point ``unitscale_fx``).

One test checks that a model is still capturable and unit-scaled, with the same criteria, settings
and explanation as ``unitscale-fx check`` (see ``docs/check.md``)::

    def test_my_model_is_unit_scaled(unitscale_check):
        unitscale_check("mypkg.models:factory")

``unitscale_check(model, **options)`` runs :func:`unitscale_fx.check.check_model` and fails the
test with :meth:`~unitscale_fx.check.ModelCheck.explanation` (the text the command line prints)
unless every criterion holds; it returns the :class:`~unitscale_fx.check.ModelCheck` when the
model passes. ``model`` is a zoo name, a ``"package.module:factory"`` spec or the factory itself.
``options`` are criteria (``min_forward=0.9``...), sizes (``hidden=64``...), ``strict``,
``timeout`` and ``loss_fn``. They override, in this order, the defaults, the settings of
``[tool.unitscale_fx]`` / ``[tool.unitscale_fx.check]`` in the ``pyproject.toml`` nearest to
pytest's rootdir, and the options of a ``@pytest.mark.unitscale_fx(...)`` marker on the test (or
its class / module).

A zoo model whose optional dependency is missing is skipped, not failed. The figures of the check
are added to the test's ``user_properties`` (they appear in pytest's ``--junitxml`` report).

This module imports nothing but pytest at import time: torch is loaded only when a test uses the
fixture. Disable the plugin with ``-p no:unitscale_fx``.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

__all__ = ["unitscale_check", "MARKER"]

#: Name of the marker carrying default options for :func:`unitscale_check`.
MARKER = "unitscale_fx"

_CALL_KEYS = ("strict", "timeout", "loss_fn")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): default options of the unitscale_check fixture for this test: criteria "
        "(min_forward=0.9, ...), sizes (hidden=64, ...), strict=True, timeout=SECONDS "
        "(see docs/check.md)",
    )


def _settings(config: pytest.Config) -> dict[str, Any]:
    from unitscale_fx import check as _check

    cache_key = "_unitscale_fx_settings"
    cached = getattr(config, cache_key, None)
    if cached is None:
        start = config.inipath if config.inipath is not None and config.inipath.name == "pyproject.toml" \
            else config.rootpath
        cached = _check.load_settings(start)
        setattr(config, cache_key, cached)
    return cached


def _marker_options(node: Any) -> dict[str, Any]:
    """Options of every ``unitscale_fx`` marker, the closest (the test function's) winning."""
    options: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(name=MARKER))):
        if mark.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER}(...) takes keyword options only, got {mark.args!r}")
        options.update(mark.kwargs)
    return options


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(criteria, sizes, call options)``; an unknown key raises ``TypeError`` naming the known ones."""
    import dataclasses

    from unitscale_fx import check as _check

    crit_names = {f.name for f in dataclasses.fields(_check.Criteria)}
    criteria, sizes, call = {}, {}, {}
    for key, value in options.items():
        k = key.replace("-", "_")
        if k in crit_names:
            criteria[k] = value
        elif k in _check.DEFAULT_SIZES:
            sizes[k] = value
        elif k in _CALL_KEYS:
            call[k] = value
        else:
            known = sorted(crit_names | set(_check.DEFAULT_SIZES) | set(_CALL_KEYS))
            raise TypeError(f"unitscale_check: unknown option {key!r}; known: {', '.join(known)}")
    return criteria, sizes, call


@pytest.fixture
def unitscale_check(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``unitscale_check(model, **options) -> ModelCheck``: check that ``model`` is unit-scaled after
    ``unitscale_fx.transform``; fails the test with the same explanation as ``unitscale-fx check``.

    ``model``: a zoo name (``"nanogpt"``), ``"package.module:factory"`` or the factory itself,
    returning ``(model, example_inputs)`` or ``(model, example_inputs, loss_fn)``. ``options``:
    criteria (``min_coverage, band, min_forward, min_backward, min_grads, outer, min_cosine,
    loss_tolerance``), sizes (``hidden, layers, heads, seq, batch, vocab, seed, device``),
    ``strict``, ``timeout`` (seconds) and ``loss_fn``.
    """
    from unitscale_fx import check as _check

    settings = _settings(request.config)
    marker = _marker_options(request.node)

    def run(model: Any, **options: Any) -> Any:
        merged = dict(marker)
        merged.update(options)
        crit_opts, size_opts, call = _split_options(merged)
        criteria = _check.Criteria.from_mapping({**settings.get("criteria", {}), **crit_opts})
        sizes = {**settings.get("sizes", {}), **size_opts}
        strict = bool(call.get("strict", settings.get("strict", False)))
        timeout = call.get("timeout", settings.get("timeout"))
        result = _check.check_model(model, criteria=criteria, sizes=sizes, strict=strict, timeout=timeout,
                                    loss_fn=call.get("loss_fn"), skip_unavailable=True)
        for key in ("coverage", "forward_in_band", "backward_in_band", "grads_in_band", "min_cosine", "loss",
                    "seconds"):
            request.node.user_properties.append((f"unitscale_fx.{result.name}.{key}", getattr(result, key)))
        if result.skipped:
            pytest.skip(f"unitscale_check: {result.explanation()}")
        if not result.passed:
            pytest.fail(result.explanation(), pytrace=False)
        return result

    return run
