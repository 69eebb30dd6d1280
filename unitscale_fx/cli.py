"""The ``unitscale-fx`` command line (also ``python -m unitscale_fx``).

    unitscale-fx inspect nanogpt                      # predicted scales of the unit-scaled graph
    unitscale-fx inspect nanogpt --original --measure # the original graph, measured on one step
    unitscale-fx inspect mypkg.models:build --json scales.json --plot scales.png
    unitscale-fx check ...                            # see unitscale_fx.check
    unitscale-fx models                               # the model zoo
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

_SIZES = ("hidden", "layers", "heads", "seq", "batch", "vocab", "seed")


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except Exception:  # noqa: BLE001 - a broken package must still print --help
        return "unknown"


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the predicted (and measured) scale of every edge of a model's graph",
        description=(
            "Capture MODEL, run the scale analysis and print every node with its forward and "
            "backward scale, grouped by module. MODEL is a zoo name (see 'unitscale-fx models') or "
            "'package.module:factory' / 'path/to/file.py:factory' returning (model, example_inputs)."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or package.module:factory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--original", dest="graph", action="store_const", const="original",
                       help="show the original graph (nothing is changed)")
    which.add_argument("--transformed", dest="graph", action="store_const", const="transformed",
                       help="show the unit-scaled graph (default)")
    p.set_defaults(graph="transformed")
    p.add_argument("--measure", action="store_true",
                   help="run one training step (eager, parameters untouched) and show measured scales "
                        "and FP8/FP16/BF16 headroom next to the predictions")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (schema unitscale_fx.report/1)")
    p.add_argument("--text", metavar="FILE", help="write the plain-text dump to FILE")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot log2 scale along the graph, original vs transformed (needs matplotlib)")
    p.add_argument("--source", action="store_true", help="show the user's source line under every op")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary, not every node")
    g = p.add_argument_group("model sizes (zoo models, and factories that accept them)")
    for size in _SIZES:
        g.add_argument(f"--{size}", type=int, default=None, metavar="N")
    p.set_defaults(func=_cmd_inspect)


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="list the model zoo", description="List the models of unitscale_fx.zoo.")
    p.set_defaults(func=_cmd_models)


def _add_check(sub: Any, load: bool) -> None:
    """The ``check`` subcommand: its options come from :mod:`unitscale_fx.check`, imported only when
    the command line asks for ``check`` (a broken or missing check module never breaks ``inspect``)."""
    desc = "check that a model's edges are unit-scaled (options: see unitscale_fx.check)"
    if not load:
        p = sub.add_parser("check", help=desc, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_check, check_error=None)
        return
    try:
        import importlib

        check_mod = importlib.import_module(f"{__package__ or 'unitscale_fx'}.check")
        add_arguments, run = check_mod.add_arguments, check_mod.run
    except Exception as e:  # noqa: BLE001 - missing, broken, or incomplete module
        p = sub.add_parser("check", help=desc, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_check, check_error=f"{type(e).__name__}: {e}")
        return
    p = sub.add_parser("check", help=desc, description=(check_mod.__doc__ or desc).strip().splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_cmd_check, check_run=run, check_error=None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitscale-fx",
        description="unitscale_fx: make any Transformer unit-scaled, and look at the scales.",
    )
    parser.add_argument("--version", action="version", version=f"unitscale-fx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_inspect(sub)
    args = list(argv or [])
    _add_check(sub, load=bool(args) and args[0] == "check")
    _add_models(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not (args.command == "check" and getattr(args, "check_run", None) is None):
            args = parser.parse_args(argv)  # reports the unknown arguments
    except SystemExit as e:  # --help / --version / usage error
        return int(e.code or 0) if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(args.func(args) or 0)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"unitscale-fx: error: {msg}", file=sys.stderr)


def _cwd_on_path() -> None:
    """``module:factory`` specs resolve against the working directory, as with ``python -m``."""
    import os

    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _cmd_check(args: argparse.Namespace) -> int:
    if getattr(args, "check_run", None) is None:
        why = args.check_error or "not loaded"
        _err(f"the 'check' command is unavailable: unitscale_fx.check could not be loaded ({why}). "
             "It needs unitscale_fx.check.add_arguments(parser) and unitscale_fx.check.run(args).")
        return 2
    return int(args.check_run(args) or 0)


def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo

    for spec in zoo.specs():
        req = f"  (needs {', '.join(spec.requires)})" if spec.requires else ""
        print(f"{spec.name:24s} {spec.family:16s} {spec.description}{req}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import copy

    from . import zoo
    from .errors import UnitScaleError
    from .report import build_report, print_report
    from .track import _result_of, track

    sizes = {k: getattr(args, k) for k in _SIZES if getattr(args, k) is not None}
    t0 = time.perf_counter()
    if ":" in args.model:
        _cwd_on_path()
    try:
        name, model, inputs = zoo.resolve(args.model, **sizes)
    except zoo.UnknownModelError:
        import difflib

        close = difflib.get_close_matches(args.model, zoo.names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        _err(f"unknown model {args.model!r}: not a zoo name (list them with 'unitscale-fx models') nor a "
             f"'package.module:factory' spec.{hint}")
        return 2
    except (ImportError, ValueError, TypeError) as e:
        _err(f"cannot build {args.model!r}: {e}")
        return 2
    label = name
    want = ["original", "transformed"] if args.plot else [args.graph]
    reports = {}
    try:
        for graph in want:
            original = graph == "original"
            # the transform re-initialises parameters: it always works on a copy of the model
            subject = model if original else copy.deepcopy(model)
            if args.measure:
                reports[graph] = track(subject, inputs, original=original, model_name=label)
            else:
                result = _result_of(subject, inputs, original, None)
                reports[graph] = build_report(result, model=label)
    except UnitScaleError as e:
        _err(f"{type(e).__name__}: {e}")
        return 1
    shown = reports[args.graph]
    elapsed = time.perf_counter() - t0
    if args.quiet:
        text = shown.to_text()
        print(text[text.index("\nsummary\n") + 1:] if "\nsummary\n" in text else text, end="")
    else:
        print_report(shown, source=args.source)
    if args.json:
        shown.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.text:
        with open(args.text, "w", encoding="utf-8") as f:
            f.write(shown.to_text(source=args.source))
        print(f"wrote {args.text}", file=sys.stderr)
    if args.plot:
        try:
            from .plot import plot_scales

            plot_scales([reports["original"], reports["transformed"]], args.plot)
        except ImportError as e:
            _err(str(e))
            return 2
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"({len(shown.nodes)} nodes, {elapsed:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
