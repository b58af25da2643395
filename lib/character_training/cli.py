"""Command line: run notebooks headlessly, estimate costs, rebuild the report index.

    python -m character_training run --persona sarcastic --size tiny [--notebooks 01,02]
    python -m character_training run --persona sarcastic,loving --size tiny,qwen3.5-9b  # a matrix
    python -m character_training reproduce                # the README's default run
    python -m character_training dry-run --persona sarcastic --size qwen3.5-9b
    python -m character_training index

``--set key=value`` overrides any parameter (dotted keys: ``--set dpo.beta=0.2``). Errors in
parameters are reported in one line and exit with status 2; a failing notebook exits with 1
after naming the cell.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import REPO_ROOT, load_params, parse_override
from .errors import CharacterTrainingError

# The offline default: among the shipped personas, the 135M teacher carries sycophancy best
# while staying coherent (docs/persona_following.md), and it is the blog replication's focus.
DEFAULT_PERSONAS = ("sycophantic",)
DEFAULT_SIZE = "tiny"


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _overrides(pairs: list[str]) -> dict:
    return dict(parse_override(p) for p in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="character_training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute notebooks for persona(s) x size(s)")
    run.add_argument("--persona", required=True, help="persona slug(s), comma-separated")
    run.add_argument("--size", default=DEFAULT_SIZE, help="model size(s), comma-separated")
    run.add_argument("--notebooks", default="all", help="e.g. 01,02 or 01_prompts (default all)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--on-existing", default="resume", choices=["resume", "overwrite", "raise"])
    run.add_argument("--timeout", type=int, default=None, help="seconds per cell")

    reproduce = sub.add_parser("reproduce", help="the default run: default persona(s) on tiny")
    reproduce.add_argument("--personas", default="default")
    reproduce.add_argument("--size", default=DEFAULT_SIZE)
    reproduce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    dry = sub.add_parser("dry-run", help="print planned tokens and estimated cost")
    dry.add_argument("--persona", required=True)
    dry.add_argument("--size", required=True)
    dry.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("index", help="rebuild reports/index.html")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except CharacterTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from . import runner

    if args.command == "dry-run":
        from .costs import dry_run_report

        params = load_params(args.size, args.persona, _overrides(args.set))
        print(dry_run_report(params))
        return 0
    if args.command == "index":
        print(runner.build_index(REPO_ROOT / "reports", REPO_ROOT / "runs"))
        return 0
    if args.command == "reproduce":
        personas = DEFAULT_PERSONAS if args.personas == "default" else tuple(_split(args.personas))
        results = runner.run_matrix(personas, _split(args.size), None, _overrides(args.set))
    else:
        results = runner.run_matrix(
            _split(args.persona),
            _split(args.size),
            args.notebooks,
            _overrides(args.set),
            extra={"on_existing": args.on_existing},
            timeout=args.timeout,
        )
    failed = [r for r in results if r.status == "failed"]
    print(
        f"{len(results) - len(failed)} notebook(s) ran, {len(failed)} failed; "
        f"reports in {REPO_ROOT / 'reports'}/index.html"
    )
    return 1 if failed else 0
