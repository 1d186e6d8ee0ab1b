"""The ``seqscope`` command line: demo, info, diagnose, dashboard.

Every user error (missing or damaged trace, bad option) prints one line to
stderr and exits with code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from seqscope.errors import SeqscopeError

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"seqscope: {message}\n")


def _whole(text: str, low: int, high: int | None, what: str) -> int:
    """An argparse type: a whole number in [low, high]; anything else is one usage line."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return n


def _port(text: str) -> int:
    return _whole(text, 1, 65535, "a port number (1 to 65535)")


def _at_least_one(text: str) -> int:
    return _whole(text, 1, None, "a whole number of at least 1")


def _open(path: str) -> Any:
    """Open a trace for a command: first in a child process with a time limit
    (a damaged file can hang the HDF5 library), then here."""
    from seqscope.trace.probe import check_readable
    from seqscope.trace.reader import open_trace

    if os.path.isfile(path):
        check_readable(path)
    return open_trace(path)


def _cmd_info(args: argparse.Namespace) -> int:
    with _open(args.trace) as trace:
        info = trace.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"trace          {info['path']}")
    print(f"schema version {info['schema_version']}")
    print(f"size           {info['bytes'] / 1e6:.2f} MB")
    state = "yes" if info["closed_cleanly"] else "no (still being written, or the writer was killed)"
    print(f"closed cleanly {state}")
    if info["recorded_steps"]:
        print(f"recorded steps {info['recorded_steps']} (steps {info['first_step']} .. {info['last_step']})")
    else:
        print("recorded steps 0")
    if info.get("evaluation_passes"):
        print(f"eval passes    {info['evaluation_passes']} (forwards under torch.no_grad(); phase=\"eval\")")
    print("layers")
    for layer in info["layers"]:
        print(
            f"  {layer['name']:<24} {layer['kind']:<9} input {layer['input_size']:<5} "
            f"hidden {layer['hidden_size']:<5} output {layer['output_size']}"
        )
    print(f"scalars        {len(info['scalars'])}: " + ", ".join(info["scalars"][:8])
          + (" ..." if len(info["scalars"]) > 8 else ""))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from seqscope import demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = demo.run(args.out, steps=args.steps, every=args.every)
    print(f"trace written to {path}")
    if args.no_dashboard:
        print(f"open it with: seqscope dashboard {path}")
        return EXIT_OK
    return _serve(str(path), args.host, args.port)


def _serve(path: str, host: str, port: int) -> int:
    try:
        from seqscope.dashboard import serve
    except ImportError as exc:
        print(
            f"seqscope: the dashboard needs dash and plotly ({exc}); install with: pip install 'seqscope[dashboard]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    serve(path, host=host, port=port)
    return EXIT_OK


def _cmd_dashboard(args: argparse.Namespace) -> int:
    _open(args.trace).close()  # fail here, with one line, on a bad trace
    return _serve(args.trace, args.host, args.port)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from seqscope.diagnose import diagnose, render_text

    with _open(args.trace) as trace:
        findings = diagnose(trace)
        recorded = len(trace.steps)
    if args.json:
        print(json.dumps({"findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        print(render_text(findings, args.trace, recorded))
    if args.strict and any(f.severity == "error" for f in findings):
        return EXIT_FINDINGS
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seqscope", description="Record and inspect recurrent networks while they train.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="record a demo training run (2-layer LSTM) and open the dashboard on it")
    p.add_argument("--out", default="runs/demo.h5", help="trace path (default: runs/demo.h5)")
    p.add_argument("--steps", type=_at_least_one, default=600, help="training steps (default 600)")
    p.add_argument("--every", type=_at_least_one, default=10, help="record every N-th step (default 10)")
    p.add_argument("--no-dashboard", action="store_true", help="only record, do not serve the dashboard")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8050)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="what a trace holds")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("diagnose", help="find vanishing/exploding gradients and other failures in a trace")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true", help='print {"findings": [...]}')
    p.add_argument("--strict", action="store_true", help="exit 1 when an error-severity finding exists")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("dashboard", help="serve the dashboard for a trace")
    p.add_argument("trace")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8050)
    p.set_defaults(func=_cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except SeqscopeError as exc:
        print(f"seqscope: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`seqscope info t.h5 | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
