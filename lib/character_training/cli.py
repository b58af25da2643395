"""Command line: run notebooks headlessly, estimate costs, rebuild the report index.

    python -m character_training run --persona sarcastic --size tiny [--notebooks 01,02]
    python -m character_training run --persona sarcastic,loving --size tiny,qwen3.5-9b  # a matrix
    python -m character_training run --persona a,b --size qwen3.5-4b,qwen3.5-9b --jobs 4  # at once
    python -m character_training reproduce                # the README's default run
    python -m character_training dry-run --persona sarcastic --size qwen3.5-9b  # or a matrix
    python -m character_training index
    python -m character_training summary                  # reports/summary.html: all runs
    python -m character_training publish [--out DIR]      # offline folder for a blog appendix
    python -m character_training persona new|import|check|preview|list ...   # authoring
    python -m character_training calibrate --size tiny [--reps 200] [--json]  # statistics check

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
# Every notebook's default persona/size is this run (tests/test_notebooks.py checks it), so a
# notebook opened in JupyterLab after `make reproduce` resumes the finished run.
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
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="persona x size chains run at once (default 1; each chain's notebooks in order)",
    )

    reproduce = sub.add_parser("reproduce", help="the default run: default persona(s) on tiny")
    reproduce.add_argument("--personas", default="default")
    reproduce.add_argument("--size", default=DEFAULT_SIZE)
    reproduce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for command in (run, reproduce):
        command.add_argument(
            "--max-usd",
            type=float,
            default=None,
            metavar="X",
            help="refuse to start when the estimate of what is left exceeds X USD, and stop a "
            "chain (resumable) when the matrix's spend ledger would cross it",
        )

    dry = sub.add_parser("dry-run", help="print planned tokens and estimated cost")
    dry.add_argument("--persona", required=True, help="persona slug(s), comma-separated")
    dry.add_argument("--size", required=True, help="model size(s), comma-separated")
    dry.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("index", help="rebuild reports/index.html")

    summary = sub.add_parser(
        "summary", help="compare every run (persona x size) in reports/summary.html"
    )
    summary.add_argument("--runs-dir", default=None, metavar="DIR", help="default: runs/")
    summary.add_argument("--reports-dir", default=None, metavar="DIR", help="default: reports/")

    publish = sub.add_parser(
        "publish", help="write a self-contained, offline folder of every report"
    )
    publish.add_argument("--out", default=None, metavar="DIR", help="default: dist/blog-appendix")
    publish.add_argument("--runs-dir", default=None, metavar="DIR", help="default: runs/")
    publish.add_argument("--reports-dir", default=None, metavar="DIR", help="default: reports/")

    calibrate = sub.add_parser(
        "calibrate",
        help="false-positive rate, coverage and detectable effect of every headline statistic",
        description="Simulate the evaluation statistics at a preset's sample sizes on scripted "
        "judges and models with a known truth (position bias, word taste, a leaning that "
        "survives a reply at another strength, unrelated models) and print, per statistic, "
        "its false-positive rate at the nominal 5%%, the coverage of its 95%% interval and the "
        "effect it detects with 80%% power. Use it to choose evals.elo_comparisons, probe "
        "counts and classifier prompts before paying for a run.",
    )
    calibrate.add_argument("--size", default=DEFAULT_SIZE)
    calibrate.add_argument("--persona", default=DEFAULT_PERSONAS[0])
    calibrate.add_argument("--reps", type=int, default=200, help="simulated experiments per point")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--json", action="store_true", help="print the rows as JSON")
    calibrate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    _add_persona_commands(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except CharacterTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "persona":
        return _persona(args)
    if args.command == "calibrate":
        return _calibrate(args)

    from . import runner

    if args.command == "dry-run":
        from .matrix_budget import matrix_report

        overrides = _overrides(args.set)
        sizes = list(dict.fromkeys(_split(args.size)))
        plans = [
            load_params(size, persona, overrides)
            for persona in dict.fromkeys(_split(args.persona))
            for size in sizes
        ]
        print(matrix_report(plans))
        return 0
    if args.command == "index":
        print(runner.build_index(REPO_ROOT / "reports", REPO_ROOT / "runs"))
        return 0
    if args.command in ("summary", "publish"):
        return _summary_or_publish(args)
    from .spend_cap import apply_cli_cap

    apply_cli_cap(args, DEFAULT_PERSONAS, _overrides(args.set))  # --max-usd: refuse or set
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
            jobs=args.jobs,
        )
    failed = [r for r in results if r.status == "failed"]
    print(
        f"{len(results) - len(failed)} notebook(s) ran, {len(failed)} failed; "
        f"reports in {REPO_ROOT / 'reports'}/index.html"
    )
    return 1 if failed else 0


def _summary_or_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import runner

    runs_dir = Path(args.runs_dir) if args.runs_dir else REPO_ROOT / "runs"
    reports_dir = Path(args.reports_dir) if args.reports_dir else REPO_ROOT / "reports"
    if args.command == "summary":
        from .summary import build_summary

        path = build_summary(runs_dir, reports_dir)
        runner.build_index(reports_dir, runs_dir)  # so the index links the summary
        print(path)
        return 0
    from .publish import publish

    print(publish(Path(args.out) if args.out else None, runs_dir, reports_dir).describe())
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from .calibration.table import calibrate, cases, design_sizes, format_table
    from .errors import ConfigError

    if args.reps < 10:
        raise ConfigError(f"--reps {args.reps}: expected at least 10 simulated experiments")
    params = load_params(args.size, args.persona, _overrides(args.set))
    bar = tqdm(total=len(cases(design_sizes(params))), desc="calibrate", unit="statistic")

    def progress(statistic: str) -> None:
        if bar.n or bar.last_print_n:
            bar.update(1)
        bar.set_postfix_str(statistic[:40])

    sizes, rows = calibrate(params, args.reps, args.seed, progress)
    bar.update(bar.total - bar.n)
    bar.close()
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print(
            f"calibrate --size {args.size}: {args.reps} simulated experiments per point; "
            f"sizes {sizes.as_dict()}"
        )
        print(format_table(rows))
    return 0


# -- persona authoring ----------------------------------------------------------------------
PERSONA_HELP = """Write, import, check and preview a persona before any run.

  persona new NAME                     commented constitution skeleton + params file
  persona import FILE --name NAME      the paper's JSON format -> both files
  persona check NAME|FILE [--strict]   validate; exit 1 on errors (or warnings with --strict)
  persona preview NAME [--size tiny]   teacher with vs. student without the constitution
  persona list                         personas, assertion counts, opt-in, params file

Nothing is overwritten without --force. --constitutions-dir/--params-dir point at other
folders (default: the repository's constitutions/ and params/)."""


def _add_persona_commands(sub: argparse._SubParsersAction) -> None:
    from .authoring import DEFAULT_SIZE as AUTHORING_SIZE

    dirs = argparse.ArgumentParser(add_help=False)
    dirs.add_argument("--constitutions-dir", default=None, metavar="DIR")
    dirs.add_argument("--params-dir", default=None, metavar="DIR")

    persona = sub.add_parser(
        "persona",
        help="write, import, check and preview a persona",
        description=PERSONA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = persona.add_subparsers(dest="persona_command", required=True)

    new = actions.add_parser("new", parents=[dirs], help="write a constitution skeleton")
    new.add_argument("name", help="persona slug, e.g. stoic")
    new.add_argument("--display-name", default=None)
    new.add_argument("--description", default=None, help="one line (else a slot to fill in)")
    new.add_argument("--assertions", type=int, default=5, help="assertion blocks (default 5)")
    new.add_argument(
        "--params-only",
        action="store_true",
        help="write only params/personas/NAME.yaml, for a constitution that already exists",
    )
    new.add_argument("--force", action="store_true", help="overwrite existing files")

    imp = actions.add_parser("import", parents=[dirs], help="convert the paper's JSON format")
    imp.add_argument("file", help='JSON list of {"trait", "questions"} entries')
    imp.add_argument("--name", required=True, help="persona slug for the new files")
    imp.add_argument("--description", default=None, help="one line (default: from the name)")
    imp.add_argument("--display-name", default=None)
    imp.add_argument("--size", default=AUTHORING_SIZE, help="preset for the follow-up check")
    imp.add_argument("--force", action="store_true", help="overwrite existing files")

    check = actions.add_parser("check", parents=[dirs], help="validate without running")
    check.add_argument("target", metavar="NAME|FILE")
    check.add_argument("--size", default=AUTHORING_SIZE, help="preset whose teacher is checked")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--strict", action="store_true", help="warnings also exit 1")

    preview = actions.add_parser(
        "preview", parents=[dirs], help="teacher with vs. student without the constitution"
    )
    preview.add_argument("name")
    preview.add_argument("--size", default=AUTHORING_SIZE)
    preview.add_argument("--prompts", type=int, default=4, help="prompts to sample (default 4)")
    preview.add_argument(
        "--max-tokens", type=int, default=None, help="default: sampling.max_tokens"
    )
    preview.add_argument("--width", type=int, default=0, help="table width (default: terminal)")
    preview.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    preview.add_argument("--yes", action="store_true", help="do not ask before paid sampling")

    actions.add_parser("list", parents=[dirs], help="the available personas")


def _persona(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import authoring, persona_preview
    from .errors import ConfigError

    dirs = authoring.PersonaDirs(
        Path(args.constitutions_dir) if args.constitutions_dir else authoring.CONSTITUTIONS_DIR,
        Path(args.params_dir) if args.params_dir else authoring.PARAMS_DIR,
    )
    command = args.persona_command
    if command == "list":
        print(authoring.format_persona_list(authoring.list_personas(dirs)))
        return 0
    if command == "new":
        if args.params_only:
            path = authoring.write_params_file(args.name, dirs, force=args.force)
            print(f"wrote {authoring.label(path)}")
            return 0
        constitution_file, params_file = authoring.write_skeleton(
            args.name,
            dirs,
            display_name=args.display_name,
            description=args.description,
            assertions=args.assertions,
            force=args.force,
        )
        print(f"wrote {authoring.label(constitution_file)} and {authoring.label(params_file)}")
        print(
            f"next: replace every {{UPPER_CASE}} slot in {authoring.label(constitution_file)}, "
            f"then run: python -m character_training persona check {args.name}" + _dirs_flags(args)
        )
        return 0
    if command == "import":
        description = args.description or (
            f"{args.name.replace('-', ' ').title()}, imported from {Path(args.file).name}."
        )
        constitution, constitution_file, params_file = authoring.import_persona(
            args.file,
            args.name,
            description,
            dirs,
            display_name=args.display_name,
            force=args.force,
        )
        print(
            f"wrote {authoring.label(constitution_file)} ({len(constitution.assertions)} "
            f"assertions, {len(constitution.hand_written_prompts())} prompts) and "
            f"{authoring.label(params_file)}"
        )
        report = authoring.check_persona(args.name, size=args.size, dirs=dirs)
        print("\n".join(report.lines()))
        return 0
    if command == "check":
        report = authoring.check_persona(
            args.target, size=args.size, overrides=_overrides(args.set), dirs=dirs
        )
        print("\n".join(report.lines(args.strict)))
        return 0 if report.passed(args.strict) else 1
    if command == "preview":
        from .backends import service_client_for

        params = authoring.params_for(args.size, args.name, _overrides(args.set), dirs)
        if not dirs.params_file(args.name).is_file():
            # the same refusal `run` gives, with the way out
            raise ConfigError(
                f"unknown persona {args.name!r}: expected "
                f"{authoring.label(dirs.params_file(args.name))}; write it with "
                f"`python -m character_training persona new {args.name} --params-only`"
            )
        constitution = persona_preview.load_run_constitution(params, dirs)
        plan = persona_preview.preview_plan(params, constitution, args.prompts, args.max_tokens)
        if params.backend == "tinker":
            cost = persona_preview.estimate_preview_cost(plan)
            print(persona_preview.format_preview_cost(plan, cost), flush=True)
            if not args.yes and not _confirm("sample on Tinker now?"):
                print("cancelled; nothing was sampled")
                return 1
        rows = persona_preview.sample_preview(plan, service_client_for(params))
        print(persona_preview.format_side_by_side(plan, rows, args.width))
        return 0
    raise ConfigError(f"persona {command!r}: expected new, import, check, preview or list")


def _dirs_flags(args: argparse.Namespace) -> str:
    flags = ""
    if args.constitutions_dir:
        flags += f" --constitutions-dir {args.constitutions_dir}"
    if args.params_dir:
        flags += f" --params-dir {args.params_dir}"
    return flags


def _confirm(question: str) -> bool:
    """Ask on a terminal; never wait on a pipe (a script or notebook would hang)."""
    from .errors import ConfigError

    if not sys.stdin.isatty():
        raise ConfigError(
            "persona preview on Tinker costs money: pass --yes to confirm (stdin is not a "
            "terminal, so no question is asked)"
        )
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")
