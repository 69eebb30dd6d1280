"""The built-in model zoo: small, deterministic Transformers to capture, transform and train.

Every zoo entry is a *factory* ``factory(*, hidden, layers, heads, seq, batch, vocab, seed,
device) -> (model, example_inputs)``. ``example_inputs`` is a dict of keyword arguments (or a
tuple of positional arguments) exactly as the model is called, and always includes the labels /
targets, so the loss is computed *inside* the model: the output is the loss itself, a dict with
``"loss"``, an object with ``.loss`` (Hugging Face) or a tuple whose last item is the loss
(nanoGPT's ``(logits, loss)``).

Public API::

    from unitscale_fx import zoo

    zoo.names()                       # sorted names: built-ins + entry points
    model, inputs = zoo.get("llama", hidden=64, layers=2, heads=4, seq=16, batch=2)
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    zoo.spec("llama")                 # ZooSpec(name, family, description, requires, factory)
    zoo.resolve("my_pkg.models:build", hidden=64)   # zoo name or "module:factory"

Determinism: :func:`get` seeds a private copy of the global RNG with ``seed`` (the caller's RNG
state is restored afterwards) before calling the factory, so the same ``seed`` gives identical
weights and identical inputs. The model is built under ``with torch.device(device)``;
``device="meta"`` gives a model (and inputs) without storage, for capture-only work.

Registering your own models
---------------------------
In code, decorate a factory::

    @zoo.register("tiny_mlp_lm", family="custom", description="...")
    def build(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
        ...
        return model, {"input_ids": ids, "labels": ids}

From another distribution, declare an entry point in the group ``unitscale_fx.zoo``::

    [project.entry-points."unitscale_fx.zoo"]
    my_models = "my_pkg.zoo:register_zoo"     # a callable, or a dict name -> factory

The entry point is loaded lazily, the first time the registry is consulted (:func:`names`,
:func:`get`, :func:`spec`, :func:`resolve`), via :mod:`importlib.metadata`. It may point at

* a callable ``register_zoo()``, called with no arguments; it registers its models with
  :func:`register` (and may also return a dict ``name -> factory``, registered as below), or
* a dict ``name -> factory`` (or ``name -> ZooSpec``); plain factories get ``family="custom"``.

A broken entry point only produces a :class:`RuntimeWarning`; it never hides the built-ins.

Ad hoc factories need no registration at all: ``resolve("package.module:factory")`` imports the
module and calls ``factory`` (passing the size keywords it accepts). ``"path/to/file.py:factory"``
is accepted too.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = [
    "ZooSpec",
    "UnknownModelError",
    "FAMILIES",
    "ENTRY_POINT_GROUP",
    "names",
    "get",
    "spec",
    "specs",
    "register",
    "load_factory",
    "resolve",
    "loss_of",
    "call",
]

#: Allowed values of :attr:`ZooSpec.family`.
FAMILIES = ("decoder", "encoder", "encoder-decoder", "vision", "speech", "moe", "custom")

#: The ``importlib.metadata`` entry-point group scanned for third-party zoo entries.
ENTRY_POINT_GROUP = "unitscale_fx.zoo"

#: Keyword arguments every factory accepts, with the defaults of :func:`get`.
SIZE_DEFAULTS: dict[str, Any] = {
    "hidden": 256,
    "layers": 4,
    "heads": 4,
    "seq": 128,
    "batch": 4,
    "vocab": 1024,
    "seed": 0,
    "device": "cpu",
}

Factory = Callable[..., "tuple[nn.Module, Any]"]


@dataclass(frozen=True)
class ZooSpec:
    """One registered zoo entry.

    Attributes:
        name: the registry key.
        family: one of :data:`FAMILIES`.
        description: one line for listings.
        requires: importable module names the factory needs (e.g. ``("transformers",)``).
        factory: ``factory(*, hidden, layers, heads, seq, batch, vocab, seed, device)``
            returning ``(model, example_inputs)``.
    """

    name: str
    family: str
    description: str = ""
    requires: tuple[str, ...] = ()
    factory: Factory | None = field(default=None, repr=False, compare=False)

    @property
    def available(self) -> bool:
        """``True`` when every module in :attr:`requires` can be imported."""
        return not _missing_requirements(self.requires)


class UnknownModelError(KeyError, ValueError):
    """No zoo entry of that name (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, ZooSpec] = {}
_BUILTIN_MODULES = ("nanogpt", "encoder_lm", "hf")
_builtins_loaded = False
_entry_points_loaded = False


def _same_factory(a: Callable | None, b: Callable | None) -> bool:
    if a is b:
        return True
    return (
        a is not None
        and b is not None
        and getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
    )


def _add(entry: ZooSpec) -> ZooSpec:
    old = _REGISTRY.get(entry.name)
    if old is not None and not _same_factory(old.factory, entry.factory):
        raise ValueError(
            f"zoo name {entry.name!r} is already registered (by "
            f"{getattr(old.factory, '__module__', '?')}.{getattr(old.factory, '__qualname__', '?')}); "
            "choose another name"
        )
    _REGISTRY[entry.name] = entry
    return entry


def register(
    name: str,
    *,
    family: str,
    description: str = "",
    requires: tuple[str, ...] | list[str] = (),
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory`` under ``name``; returns the factory unchanged.

    The factory must accept the keywords of :func:`get` (``hidden, layers, heads, seq, batch,
    vocab, seed, device``) and return ``(model, example_inputs)``. Registering a second,
    different factory under a taken name raises ``ValueError``; re-registering the same function
    (a module reload) is allowed.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"zoo name must be a non-empty string without ':', got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"zoo family must be one of {FAMILIES}, got {family!r} (for {name!r})")
    if isinstance(requires, str):
        requires = (requires,)
    requires = tuple(requires)

    def deco(factory: Factory) -> Factory:
        if not callable(factory):
            raise TypeError(f"zoo.register({name!r}) must decorate a callable, got {factory!r}")
        _add(ZooSpec(name, family, description, requires, factory))
        return factory

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def _iter_entry_points():
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # pragma: no cover - broken metadata
        warnings.warn(f"unitscale_fx.zoo: could not list entry points: {exc}", RuntimeWarning, stacklevel=3)
        return []


def _register_mapping(mapping: Mapping[str, Any], origin: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, ZooSpec):
            entry = value if value.name == key else ZooSpec(key, value.family, value.description, value.requires, value.factory)
        elif callable(value):
            doc = (inspect.getdoc(value) or "").strip().splitlines()
            entry = ZooSpec(str(key), "custom", doc[0] if doc else f"from {origin}", (), value)
        else:
            raise TypeError(f"{origin}: value for {key!r} is neither a factory nor a ZooSpec: {value!r}")
        _add(entry)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in _iter_entry_points():
        origin = f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
            if isinstance(obj, Mapping):
                _register_mapping(obj, origin)
            elif callable(obj):
                ret = obj()
                if isinstance(ret, Mapping):
                    _register_mapping(ret, origin)
            else:
                raise TypeError("must load a callable register_zoo() or a dict name -> factory")
        except Exception as exc:
            warnings.warn(f"unitscale_fx.zoo: skipping {origin}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


def _ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def names() -> list[str]:
    """Sorted names of every registered model (built-ins and entry points)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def specs() -> list[ZooSpec]:
    """Every :class:`ZooSpec`, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def spec(name: str) -> ZooSpec:
    """The :class:`ZooSpec` of ``name``; :class:`UnknownModelError` with suggestions if absent."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(
            f"unknown zoo model {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}. "
            "For your own factory pass 'package.module:factory' to zoo.resolve()."
        ) from None


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _missing_requirements(requires: tuple[str, ...]) -> list[str]:
    missing = []
    for mod in requires:
        if sys.modules.get(mod) is not None:
            continue
        if mod in sys.modules:  # set to None: deliberately blocked
            missing.append(mod)
            continue
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except (ImportError, ValueError):
            missing.append(mod)
    return missing


def _validate_sizes(name: str, sizes: dict[str, Any]) -> None:
    for key in ("hidden", "layers", "heads", "seq", "batch", "vocab"):
        value = sizes[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"zoo.get({name!r}): {key} must be a positive int, got {value!r}")
    if not isinstance(sizes["seed"], int):
        raise ValueError(f"zoo.get({name!r}): seed must be an int, got {sizes['seed']!r}")
    if sizes["hidden"] % sizes["heads"]:
        raise ValueError(
            f"zoo.get({name!r}): heads ({sizes['heads']}) must divide hidden ({sizes['hidden']})"
        )


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _check_result(result: Any, label: str) -> tuple[nn.Module, Any]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise TypeError(
            f"zoo factory {label!r} must return (nn.Module, example_inputs), got {type(result).__name__}"
        )
    model, inputs = result
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, (dict, tuple)):
        inputs = (inputs,)
    return model, inputs


def _build(factory: Callable, kwargs: dict[str, Any], seed: int, device: Any, label: str):
    dev = torch.device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        with dev:
            result = factory(**kwargs)
    model, inputs = _check_result(result, label)
    if dev.type == "meta":
        if any(t.device.type != "meta" for t in list(model.parameters()) + list(model.buffers())):
            model = model.to(dev)
    inputs = _map_tensors(inputs, lambda t: t if t.device == dev else t.to(dev))
    return model, inputs


def get(
    name: str,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    seq: int = 128,
    batch: int = 4,
    vocab: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict | tuple]:
    """Build zoo model ``name``: ``(model in train mode, example_inputs)``.

    ``example_inputs`` is a dict of keyword arguments (or a tuple of positional ones) including
    the labels, so ``model(**example_inputs)`` computes the loss. Same ``seed`` -> identical
    weights and inputs. Raises :class:`UnknownModelError` for an unknown name, ``ImportError``
    when an optional dependency (``spec(name).requires``) is missing and ``ValueError`` for bad
    sizes (``heads`` must divide ``hidden``).
    """
    entry = spec(name)
    missing = _missing_requirements(entry.requires)
    if missing:
        raise ImportError(
            f"zoo model {name!r} needs {', '.join(missing)}; install it "
            f"(e.g. pip install 'unitscale_fx[hf]' for transformers)"
        )
    sizes = dict(hidden=hidden, layers=layers, heads=heads, seq=seq, batch=batch, vocab=vocab, seed=seed, device=device)
    _validate_sizes(name, sizes)
    model, inputs = _build(entry.factory, sizes, seed, device, name)
    model.train()
    return model, inputs


# --------------------------------------------------------------------------------------------
# "module:factory" specs
# --------------------------------------------------------------------------------------------


def _import_path(spec_str: str, path: str):
    mod_name = "_unitscale_zoo_user_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load {path!r} (from factory spec {spec_str!r})")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def load_factory(spec_str: str) -> Callable[..., Any]:
    """Import ``"package.module:factory"`` (or ``"path/to/file.py:factory"``) and return the callable.

    ``factory`` may be a dotted attribute path (``"pkg.mod:Class.build"``). Raises ``ValueError``
    for a malformed spec or a missing / non-callable attribute and ``ImportError`` when the module
    cannot be imported; both name the spec.
    """
    if not isinstance(spec_str, str):
        raise ValueError(f"factory spec must be a string 'package.module:factory', got {spec_str!r}")
    module_part, sep, attr_part = spec_str.strip().rpartition(":")
    if not sep or not module_part or not attr_part:
        raise ValueError(
            f"bad factory spec {spec_str!r}: expected 'package.module:factory' "
            "(a module path, a colon, then the factory's name)"
        )
    if not all(p.isidentifier() for p in attr_part.split(".")):
        raise ValueError(f"bad factory spec {spec_str!r}: {attr_part!r} is not a (dotted) Python name")
    is_file = module_part.endswith(".py")
    if not is_file and not all(p.isidentifier() for p in module_part.split(".")):
        raise ValueError(
            f"bad factory spec {spec_str!r}: {module_part!r} is neither a dotted module name nor a .py file"
        )
    try:
        if is_file:
            if not os.path.isfile(module_part):
                raise ImportError(f"no such file {module_part!r}")
            module = _import_path(spec_str, module_part)
        else:
            module = importlib.import_module(module_part)
    except ImportError as exc:
        raise ImportError(f"cannot import {module_part!r} for factory spec {spec_str!r}: {exc}") from exc
    obj: Any = module
    for part in attr_part.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"bad factory spec {spec_str!r}: module {module_part!r} has no attribute {attr_part!r}"
            ) from None
    if not callable(obj):
        raise ValueError(f"bad factory spec {spec_str!r}: {attr_part!r} is not callable ({type(obj).__name__})")
    return obj


def _accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    ok = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in ok}


def resolve(spec_or_name: str, **sizes: Any) -> tuple[str, nn.Module, dict | tuple]:
    """``(name, model, example_inputs)`` for a zoo name or a ``"module:factory"`` spec.

    A zoo name goes through :func:`get` with ``sizes``. A factory spec is loaded with
    :func:`load_factory` and called with those of ``sizes`` it accepts by name (all of them if it
    takes ``**kwargs``; none if it takes no arguments); when it accepts ``seed``/``device`` they
    are used as in :func:`get`. The model's train/eval mode is left as the factory set it.
    """
    unknown = set(sizes) - set(SIZE_DEFAULTS)
    if unknown:
        raise TypeError(f"zoo.resolve() got unknown size keywords {sorted(unknown)}; allowed: {list(SIZE_DEFAULTS)}")
    if not isinstance(spec_or_name, str) or not spec_or_name.strip():
        raise ValueError(f"expected a zoo name or 'package.module:factory', got {spec_or_name!r}")
    if ":" not in spec_or_name:
        model, inputs = get(spec_or_name, **sizes)
        return spec_or_name, model, inputs
    factory = load_factory(spec_or_name)
    kwargs = _accepted_kwargs(factory, sizes)
    seed = sizes.get("seed", SIZE_DEFAULTS["seed"])
    device = sizes.get("device", SIZE_DEFAULTS["device"])
    if "seed" in kwargs or "device" in kwargs or "seed" in sizes or "device" in sizes:
        model, inputs = _build(factory, kwargs, seed, device, spec_or_name)
    else:
        model, inputs = _check_result(factory(**kwargs), spec_or_name)
    return spec_or_name, model, inputs


# --------------------------------------------------------------------------------------------
# helpers shared by the built-in factories and tests
# --------------------------------------------------------------------------------------------


def call(model: nn.Module, inputs: dict | tuple) -> Any:
    """``model(**inputs)`` or ``model(*inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def loss_of(output: Any) -> torch.Tensor:
    """The loss inside a model output: a tensor, ``out["loss"]``, ``out.loss`` or ``out[-1]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, (tuple, list)) and output and isinstance(output[-1], torch.Tensor):
        return output[-1]
    raise TypeError(f"cannot find a loss in model output of type {type(output).__name__}")


def _generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for example inputs, independent of the weight-init RNG."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + 7919 * (stream + 1)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _tokens(gen: torch.Generator, batch: int, seq: int, vocab: int, low: int = 0) -> torch.Tensor:
    """``(batch, seq)`` int64 token ids in ``[low, vocab)`` on the CPU (``low`` ignored if too big)."""
    if low >= vocab:
        low = 0
    return torch.randint(low, vocab, (batch, seq), generator=gen, device="cpu", dtype=torch.long)


def _mlm_labels(gen: torch.Generator, tokens: torch.Tensor, vocab: int, frac: float = 0.15, low: int = 0) -> torch.Tensor:
    """Masked-LM labels: random target tokens at ``round(frac*seq)`` (>= 1) positions per row, -100 elsewhere."""
    batch, seq = tokens.shape
    k = max(1, round(frac * seq))
    labels = torch.full_like(tokens, -100)
    targets = _tokens(gen, batch, seq, vocab, low)
    for row in range(batch):
        pos = torch.randperm(seq, generator=gen, device="cpu")[:k]
        labels[row, pos] = targets[row, pos]
    return labels
