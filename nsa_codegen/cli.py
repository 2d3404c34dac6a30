"""`python -m nsa_codegen generate|list|cache|bench|demo`."""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from .codegen.render import GENERATED_DIR, generate
    from .codegen.variants import default_variants

    result = generate(default_variants(), GENERATED_DIR)
    print(f"{result['total']} variants in {GENERATED_DIR}: {len(result['changed'])} files written, "
          f"{len(result['removed'])} stale files removed")
    for name in result["changed"] + result["removed"]:
        print(f"  {name}")
    return 0


def _list(args) -> int:
    from .codegen.variants import default_variants

    for spec in default_variants():
        print(spec.name, spec.key)
    return 0


def _cache(args) -> int:
    from .codegen import cache

    if args.action == "clear":
        try:
            removed = cache.clear()
        except cache.CacheError as exc:  # e.g. a read-only cache dir: say which, no traceback
            print(exc, file=sys.stderr)
            return 1
        print(f"removed {removed} entries from {cache.cache_dir()}")
    else:
        print(cache.cache_dir())
    return 0


def _bench(args) -> int:
    try:
        from benchmarks.bench import main as bench_main
    except ImportError as exc:  # benchmarks/ lives in the repository, not in the wheel
        print(f"benchmarks need a source checkout (run from the repository root): {exc}", file=sys.stderr)
        return 2
    return bench_main(args.rest)


def _tune(args) -> int:
    from .tune import run

    return run(args.presets.split(","), [int(n) for n in args.lengths.split(",")], args.dtypes.split(","),
               args.shipped)


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main()


def _choices(name: str, allowed):
    def parse(text: str) -> str:
        bad = [t for t in text.split(",") if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; allowed: {sorted(allowed)}")
        return text
    return parse


def _lengths(text: str) -> str:
    if not all(t.isdigit() and int(t) > 0 for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return text


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `python -m nsa_codegen list | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option (and -h) belongs to benchmarks/bench.py, in order
        rest = argv[1:]
        return _bench(argparse.Namespace(rest=rest[1:] if rest[:1] == ["--"] else rest))
    parser = argparse.ArgumentParser(prog="python -m nsa_codegen")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help="render the default variant grid into generated/").set_defaults(fn=_generate)
    sub.add_parser("list", help="list the default variant grid").set_defaults(fn=_list)
    cache_p = sub.add_parser("cache", help="show or clear the user render cache")
    cache_p.add_argument("action", nargs="?", choices=("path", "clear"), default="path")
    cache_p.set_defaults(fn=_cache)
    # listed for --help only: main() hands `bench ...` to benchmarks/bench.py before parsing
    sub.add_parser("bench", help="run benchmarks/bench.py (GPU); its options follow, e.g. --quick")
    from .tune import DEFAULT_LENGTHS, DTYPES, PRESETS

    tune_p = sub.add_parser("tune", help="tune the kernels of common layer shapes on this GPU ahead of time")
    tune_p.add_argument("--presets", default=",".join(PRESETS), type=_choices("presets", PRESETS),
                        help=f"comma-separated, of {sorted(PRESETS)}")
    tune_p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), type=_lengths,
                        help="comma-separated sequence lengths")
    tune_p.add_argument("--dtypes", default=",".join(DTYPES), type=_choices("dtypes", DTYPES),
                        help=f"comma-separated, of {sorted(DTYPES)}")
    tune_p.add_argument("--shipped", action="store_true",
                        help="also merge this GPU's winners into the package's shipped table")
    tune_p.set_defaults(fn=_tune)
    sub.add_parser("demo", help="run SparseAttention on CPU and print shapes, time and paths").set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)
