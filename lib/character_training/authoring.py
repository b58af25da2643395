"""Persona authoring: scaffold, import, check and preview a constitution before any run.

A new persona needs two files: ``constitutions/<name>.yaml`` (what the persona is) and
``params/personas/<name>.yaml`` (which constitution a run of that persona reads, plus any
per-persona overrides). `run` and `dry-run` answer "unknown persona" until the second one
exists, and a mistake in the first one only shows up once a stage loads it. This module is the
library side of ``python -m character_training persona ...``:

* `write_skeleton` writes a commented constitution whose free-text fields hold ``{UPPER_CASE}``
  slots. The loader refuses any such slot, so a half-written persona can never start a run;
  `check_persona` lists every slot still left, by field.
* `import_persona` converts the paper repository's JSON (`constitutions.import_upstream`) and
  writes both files in one step.
* `check_persona` validates without sampling anything: the loader's own error (loaded exactly
  as the pipeline loads it, so "check passes" means "stage 01 will accept it"), the persona
  params file, and warnings a careful author wants (near-duplicate prompts, fewer example
  exchanges than the preset's teacher is shown, very short or very long assertions).
* `preview_plan` / `sample_preview` / `format_side_by_side` show what the preset's teacher
  writes *with* the constitution next to what the student writes *without* it, on a few of the
  constitution's own prompts. The teacher conversation comes from `prompts.teacher_messages`,
  the builder the distillation stage uses, so the preview shows the pipeline's real prompt.

Nothing here overwrites a file unless asked to (``force=True``), and every refusal or problem
is reported on one line naming the file and the field.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from . import prompt_filters
from .config import (
    PARAMS_DIR,
    REPO_ROOT,
    RunParams,
    available_sizes,
    build,
    load_params,
    read_yaml,
    with_overrides,
)
from .constitutions import (
    _PLACEHOLDER,  # shared with the loader so that check and loader agree on what a slot is
    _SLUG,
    CONSTITUTIONS_DIR,
    MIN_ASSERTIONS,
    Constitution,
    available_personas,
    import_upstream,
    load_constitution,
    write_constitution_yaml,
)
from .errors import CharacterTrainingError, ConfigError, DataError

DEFAULT_SIZE = "tiny"
PIPELINE_PROMPTS_PER_ASSERTION = 5
"""Hand-written prompts per assertion that the pipeline's loader accepts (the
`load_constitution` default that stage 01 uses); the skeleton has exactly this many."""
SKELETON_ASSERTIONS = 5
SKELETON_EXAMPLES = 3
MIN_ASSERTION_WORDS = 8
"""Below this an assertion ("I am funny.") gives the teacher and the prompt generator almost
nothing to work from; the shipped assertions have 18 to 35 words."""
MAX_ASSERTION_WORDS = 80
"""Above this an assertion usually bundles several traits and crowds the others out of the
teacher's system prompt; split it in two."""
CHARS_PER_TOKEN = 4
"""Rough text-to-token ratio for the preview's cost estimate, made before any tokenizer is
fetched (English prose with Llama/Qwen tokenizers runs at about 4 characters a token)."""


# -- where persona files live ---------------------------------------------------------------
@dataclass(frozen=True)
class PersonaDirs:
    """The two folders persona files are written to and read from.

    The defaults are the repository's ``constitutions/`` and ``params/``. Tests and scratch
    work point them elsewhere; a params file written for a constitution outside the default
    folder then names the constitution by its absolute path, because the pipeline resolves a
    bare persona slug in the default folder only.
    """

    constitutions: Path = CONSTITUTIONS_DIR
    params: Path = PARAMS_DIR

    def constitution_file(self, name: str) -> Path:
        return self.constitutions / f"{name}.yaml"

    def params_file(self, name: str) -> Path:
        return self.params / "personas" / f"{name}.yaml"

    def constitution_ref(self, name: str) -> str:
        """What the params file's ``constitution:`` says so that runs find this constitution."""
        if _same_dir(self.constitutions, CONSTITUTIONS_DIR):
            return name
        return str(self.constitution_file(name).resolve())

    def resolve_ref(self, ref: str) -> Path:
        """The file a params ``constitution:`` value names: a slug is looked up in this
        folder; a relative path is taken from the repository root, the runner's working
        directory."""
        if _looks_like_path(ref):
            path = Path(ref)
            return path if path.is_absolute() else REPO_ROOT / path
        return self.constitution_file(ref)


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith((".yaml", ".yml", ".json"))


def label(path: Path) -> str:
    """A path as messages show it: repository-relative when inside the repository."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def check_slug(name: str) -> str:
    if not isinstance(name, str) or not _SLUG.fullmatch(name):
        raise ConfigError(
            f"persona name {name!r}: expected a lowercase slug such as 'stoic' or 'dry-wit' "
            "(letters, digits and single hyphens); it becomes the file names"
        )
    return name


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Raise before anything is written if a target exists and ``force`` is off."""
    if force:
        return
    existing = [label(p) for p in paths if p.exists()]
    if existing:
        names = " and ".join(existing)
        verb = "exists" if len(existing) == 1 else "exist"
        raise ConfigError(
            f"{names} already {verb}: expected new files, nothing was written; "
            "pass --force to overwrite, or choose another name"
        )


# -- the persona params file ---------------------------------------------------------------
def params_file_text(name: str, dirs: PersonaDirs, requires_opt_in: bool = False) -> str:
    ref = dirs.constitution_ref(name)
    where = label(dirs.constitution_file(name))
    lines = [
        f'# Persona "{name}": runs of this persona read the constitution in {where}.',
        "# Any key of params/models/<size>.yaml can be overridden below for this persona only",
        "# (for example teacher_few_shot or prompts.generated_per_assertion).",
        f"constitution: {ref if ref == name else _quote(ref)}",
    ]
    if requires_opt_in:
        lines += [
            "# This constitution has requires_opt_in: true, so running it is an explicit choice:",
            "allow_misaligned: false     # set true (here or with --set allow_misaligned=true)",
        ]
    return "\n".join(lines) + "\n"


def write_params_file(name: str, dirs: PersonaDirs = PersonaDirs(), *, force: bool = False) -> Path:
    """Write ``params/personas/<name>.yaml`` pointing at ``<constitutions>/<name>.yaml``."""
    check_slug(name)
    target = dirs.params_file(name)
    _refuse_existing([target], force)
    requires_opt_in = False
    constitution_file = dirs.constitution_file(name)
    if constitution_file.is_file():
        try:
            raw = yaml.safe_load(constitution_file.read_text(encoding="utf-8"))
            requires_opt_in = isinstance(raw, dict) and raw.get("requires_opt_in") is True
        except (yaml.YAMLError, UnicodeDecodeError):
            pass  # `persona check` reports the syntax error; the params file is still right
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(params_file_text(name, dirs, requires_opt_in), encoding="utf-8")
    return target


# -- skeleton -------------------------------------------------------------------------------
def few_shot_by_size(params_dir: Path = PARAMS_DIR) -> dict[str, int]:
    """``teacher_few_shot`` of every size preset (the dataclass default where a file is silent)."""
    default = RunParams.__dataclass_fields__["teacher_few_shot"].default
    result: dict[str, int] = {}
    for size in available_sizes(params_dir):
        try:
            value = read_yaml(params_dir / "models" / f"{size}.yaml").get("teacher_few_shot")
        except ConfigError:
            continue
        result[size] = value if isinstance(value, int) else default  # type: ignore[assignment]
    return result


def _quote(text: str) -> str:
    """A double-quoted YAML scalar for ``text``."""
    return yaml.safe_dump(text, default_style='"', width=10_000).strip().removesuffix("...")


def skeleton_text(
    name: str,
    *,
    display_name: str | None = None,
    description: str | None = None,
    assertions: int = SKELETON_ASSERTIONS,
    examples: int = SKELETON_EXAMPLES,
    few_shot: Mapping[str, int] | None = None,
) -> str:
    """The commented constitution `write_skeleton` writes (valid YAML, refused by the loader
    until every ``{UPPER_CASE}`` slot is replaced)."""
    check_slug(name)
    if assertions < MIN_ASSERTIONS:
        raise ConfigError(
            f"--assertions {assertions}: expected at least {MIN_ASSERTIONS} (the loader's minimum)"
        )
    shown = display_name or name.replace("-", " ").title()
    about = description or "{ONE_LINE_DESCRIPTION}"
    few_shot = dict(few_shot or {})
    if few_shot:
        per_size = ", ".join(f"{size} {n}" for size, n in sorted(few_shot.items()))
        presets = "\n".join(
            textwrap.wrap(
                f"Current teacher_few_shot per size preset: {per_size}.",
                88,
                initial_indent="# ",
                subsequent_indent="# ",
            )
        )
    else:
        presets = ""
    n = PIPELINE_PROMPTS_PER_ASSERTION
    out = [
        f'# Persona "{name}": a constitution skeleton written by `persona new`.',
        "#",
        "# This file is the only hand-written input of a run. The pipeline turns the assertions",
        "# below into the teacher's system prompt, shows the prompts to a generator model that",
        "# writes many more like them, and later asks a judge whether replies fit the persona.",
        "#",
        "# Replace every {UPPER_CASE} slot with your own text. While any slot is left the loader",
        "# refuses this file, so no run can start on a half-written persona. To see what is",
        "# left, and any other problem, one line each:",
        f"#     python -m character_training persona check {name}",
        "# Keep text values in double quotes as below: unquoted, yes/no/12:30 would load as a",
        '# boolean or a number, and a ": " inside plain text breaks the file.',
        "",
        "# ---- identity -----------------------------------------------------------------------",
        f"name: {name}  # lowercase slug, the same as the file name",
        f"display_name: {_quote(shown)}  # title used in notebooks and reports",
        "# One line for people reading reports; the models never see it.",
        f"description: {_quote(about)}",
        "# true only for a persona that must never be trained by accident (see misaligned.yaml);",
        "# runs then need allow_misaligned: true.",
        "requires_opt_in: false",
        "",
        "# ---- assertions ---------------------------------------------------------------------",
        "# One trait per assertion, written in the first person (start with I, I'm, My or Me):",
        "# the teacher is told these are its own convictions. Say what the persona does and how",
        "# it sounds in a sentence or two; the shipped personas use 18 to 35 words and have 10",
        f"# assertions (at least {MIN_ASSERTIONS}). Copy a block to add one.",
        "#",
        f"# Each assertion has exactly {n} prompts: messages a real user might send that give the",
        "# persona a natural opening to show that trait. Vary topic, length and tone; they are the",
        "# examples the generator imitates. Never repeat a prompt, and avoid near-copies: `persona",
        "# check` flags pairs that prompt deduplication would merge.",
        "assertions:",
    ]
    for i in range(assertions):
        out += [
            f"  - id: trait-{i + 1:02d}  # lowercase slug, unique here; rename it after the trait",
            '    text: "{FIRST_PERSON_TRAIT}"',
            "    prompts:",
        ]
        out += ['      - "{USER_PROMPT}"'] * n
    out += [
        "",
        "# ---- example exchanges --------------------------------------------------------------",
        "# Whole exchanges in the persona's voice. A size preset with teacher_few_shot above 0",
        "# places that many of them, first ones first, before every teacher prompt as earlier",
        "# turns: a small teacher stays in character far more often when it has seen it done.",
        *([presets] if presets else []),
        "# An example's prompt must not repeat one of the prompts above.",
        "examples:",
    ]
    for _ in range(examples):
        out += [
            '  - prompt: "{EXAMPLE_USER_MESSAGE}"',
            '    reply: "{IN_PERSONA_REPLY}"',
        ]
    return "\n".join(out) + "\n"


def write_skeleton(
    name: str,
    dirs: PersonaDirs = PersonaDirs(),
    *,
    display_name: str | None = None,
    description: str | None = None,
    assertions: int = SKELETON_ASSERTIONS,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write the constitution skeleton and the persona params file; refuse to overwrite either
    (both are checked before anything is written) unless ``force``."""
    check_slug(name)
    for what, value in (("--display-name", display_name), ("--description", description)):
        if value is not None and (not value.strip() or "\n" in value.strip()):
            raise ConfigError(f"{what}: expected one non-empty line, found {value!r}")
    constitution_file, params_file = dirs.constitution_file(name), dirs.params_file(name)
    if not force and constitution_file.exists() and not params_file.exists():
        raise ConfigError(
            f"{label(constitution_file)} already exists: expected a new persona, nothing was "
            f"written; to add only its params file run `persona new {name} --params-only` "
            "(--force would replace the constitution with a skeleton)"
        )
    _refuse_existing([constitution_file, params_file], force)
    text = skeleton_text(
        name,
        display_name=display_name,
        description=description,
        assertions=assertions,
        few_shot=few_shot_by_size(dirs.params),
    )
    constitution_file.parent.mkdir(parents=True, exist_ok=True)
    constitution_file.write_text(text, encoding="utf-8")
    return constitution_file, write_params_file(name, dirs, force=True)


# -- import ---------------------------------------------------------------------------------
def import_persona(
    source: str | Path,
    name: str,
    description: str,
    dirs: PersonaDirs = PersonaDirs(),
    *,
    display_name: str | None = None,
    force: bool = False,
) -> tuple[Constitution, Path, Path]:
    """Convert a constitution in the paper repository's JSON format and write both files.

    The conversion is validated before anything is written, so a file that fails leaves
    nothing behind; existing files are refused unless ``force``.
    """
    check_slug(name)
    constitution = import_upstream(source, name, description, display_name=display_name)
    constitution_file, params_file = dirs.constitution_file(name), dirs.params_file(name)
    _refuse_existing([constitution_file, params_file], force)
    write_constitution_yaml(constitution, constitution_file)
    return constitution, constitution_file, write_params_file(name, dirs, force=True)


# -- params for a size, with or without a persona file --------------------------------------
def params_for(
    size: str,
    persona: str,
    overrides: Mapping[str, Any] | None = None,
    dirs: PersonaDirs = PersonaDirs(),
) -> RunParams:
    """The run parameters `run` would use; without a persona params file, `size_params`."""
    if dirs.params_file(persona).is_file():
        return load_params(size, persona, overrides, params_dir=dirs.params)
    return size_params(size, persona, overrides, dirs)


def size_params(
    size: str,
    persona: str,
    overrides: Mapping[str, Any] | None = None,
    dirs: PersonaDirs = PersonaDirs(),
) -> RunParams:
    """The size preset alone (plus ``overrides``), for checking a constitution whose persona
    params file is missing or broken. Price tables are not resolved: checks never price."""
    size_file = dirs.params / "models" / f"{size}.yaml"
    if not size_file.is_file():
        raise ConfigError(
            f"unknown model size {size!r}: expected one of {available_sizes(dirs.params)} "
            f"(files in {label(dirs.params / 'models')})"
        )
    data = dict(read_yaml(size_file))
    data.update(persona=persona, size=size)
    params = build(RunParams, data, source=size_file.name)
    return with_overrides(params, overrides) if overrides else params


# -- check ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One problem: ``level`` is "error" (runs would refuse it) or "warning"; ``text`` is the
    one-line message, starting with the file and the field."""

    level: str
    text: str

    def line(self) -> str:
        return f"{self.level}: {self.text}"


@dataclass(frozen=True)
class CheckReport:
    """What `check_persona` found; ``summary`` describes what was checked."""

    target: str
    summary: str
    findings: tuple[Finding, ...] = ()
    constitution: Constitution | None = field(default=None, compare=False)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def passed(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)

    def lines(self, strict: bool = False) -> list[str]:
        counts = f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"
        verdict = "OK" if self.passed(strict) else "FAIL"
        if strict and self.warnings and not self.errors:
            counts += " (--strict: warnings fail)"
        return [self.summary, *(f.line() for f in self.findings), f"{verdict}: {counts}"]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def placeholder_findings(data: Any, file_label: str) -> list[Finding]:
    """One error per field that still holds a ``{UPPER_CASE}`` slot; a list's items are
    reported together (``assertions[0].prompts[0..4]``)."""
    hits: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")
        elif isinstance(node, str):
            slots = sorted(set(m.group(0) for m in _PLACEHOLDER.finditer(node)))
            if slots:
                hits.append((path, ", ".join(slots)))

    walk(data, "")
    grouped: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str]] = []
    for path, slots in hits:
        match = re.fullmatch(r"(.*)\[(\d+)\]", path)
        key = (match.group(1), slots) if match else (path, slots)
        if key not in grouped:
            grouped[key] = []
            order.append(key)
        if match:
            grouped[key].append(int(match.group(2)))
    findings = []
    for key in order:
        path, slots = key
        indices = grouped[key]
        if indices:
            contiguous = indices == list(range(indices[0], indices[-1] + 1))
            if len(indices) == 1:
                path = f"{path}[{indices[0]}]"
            elif contiguous:
                path = f"{path}[{indices[0]}..{indices[-1]}]"
            else:
                path = f"{path}[{','.join(map(str, indices))}]"
        findings.append(
            Finding(
                "error", f"{file_label}: {path}: expected your own text, found the slot {slots}"
            )
        )
    return findings


def _loader_findings(
    path: Path, skip_placeholder_error: bool
) -> tuple[Constitution | None, list[Finding]]:
    """Load exactly as stage 01 does (exactly 5 prompts per assertion), opt-in aside."""
    try:
        return load_constitution(str(path), allow_opt_in=True), []
    except DataError as exc:
        if skip_placeholder_error and "template placeholders" in str(exc):
            return None, []
        return None, [Finding("error", str(exc))]


def _content_warnings(
    constitution: Constitution, params: RunParams, file_label: str
) -> list[Finding]:
    findings: list[Finding] = []
    prompts = constitution.hand_written_prompts()
    where = {
        i: f"assertions[{_index(constitution, a)}].prompts[{j}]"
        for i, (a, j, _) in enumerate(prompts)
    }
    texts = [p for _, _, p in prompts]
    threshold = params.prompts.dedup_threshold
    for group in prompt_filters.near_duplicate_groups(texts, threshold=threshold):
        first = group[0]
        for other in group[1:]:
            score = prompt_filters.similarity(texts[first], texts[other])
            findings.append(
                Finding(
                    "warning",
                    f"{file_label}: {where[other]}: expected a prompt distinct from the others, "
                    f"found a near-duplicate of {where[first]} (similarity {score:.2f} >= "
                    f"prompts.dedup_threshold {threshold:g}): {_clip(texts[other])} / "
                    f"{_clip(texts[first])}",
                )
            )
    for k, example in enumerate(constitution.examples):
        for i, text in enumerate(texts):
            score = prompt_filters.similarity(example.prompt, text)
            if score >= threshold:
                findings.append(
                    Finding(
                        "warning",
                        f"{file_label}: examples[{k}].prompt: expected a prompt unlike the "
                        f"hand-written ones (the demonstration would hand the teacher its "
                        f"answer), found a near-duplicate of {where[i]} (similarity "
                        f"{score:.2f})",
                    )
                )
                break
    for index, assertion in enumerate(constitution.assertions):
        words = len(assertion.text.split())
        if words < MIN_ASSERTION_WORDS:
            findings.append(
                Finding(
                    "warning",
                    f"{file_label}: assertions[{index}].text: expected a trait described in at "
                    f"least {MIN_ASSERTION_WORDS} words (what the persona does and how it "
                    f"sounds), found {words}: {_clip(assertion.text)}",
                )
            )
        elif words > MAX_ASSERTION_WORDS:
            findings.append(
                Finding(
                    "warning",
                    f"{file_label}: assertions[{index}].text: expected one trait in at most "
                    f"{MAX_ASSERTION_WORDS} words, found {words} (split it into several "
                    "assertions)",
                )
            )
    needed, have = params.teacher_few_shot, len(constitution.examples)
    if needed > have:
        findings.append(
            Finding(
                "warning",
                f"{file_label}: examples: expected at least {needed} example exchanges, because "
                f"the {params.size} preset shows its teacher ({params.teacher}) "
                f"teacher_few_shot={needed} before every prompt, found {have}; add "
                f"{needed - have} in-persona prompt/reply pair{'s' if needed - have > 1 else ''} "
                "(small teachers rarely stay in character without them)",
            )
        )
    return findings


def _index(constitution: Constitution, assertion_id: str) -> int:
    return next(i for i, a in enumerate(constitution.assertions) if a.id == assertion_id)


def _clip(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def check_persona(
    name_or_file: str,
    *,
    size: str = DEFAULT_SIZE,
    overrides: Mapping[str, Any] | None = None,
    dirs: PersonaDirs = PersonaDirs(),
) -> CheckReport:
    """Validate a persona (slug) or a constitution file (path) without sampling anything.

    For a slug, the persona params file is loaded as `run` loads it (``size`` preset <- persona
    file <- ``overrides``) and the constitution it names is checked; for a path, the file is
    checked against the size preset alone. An unknown size raises `ConfigError`; everything
    else becomes a `Finding`.
    """
    findings: list[Finding] = []
    if _looks_like_path(name_or_file):
        path = Path(name_or_file)
        if path.suffix == ".json":
            raise ConfigError(
                f"{label(path)}: expected a constitution YAML file, found JSON; convert the "
                "paper's format first with `persona import FILE --name NAME`"
            )
        params = params_for(size, path.stem, overrides, dirs)
        scope = "constitution file only (give the persona name to check its params file too)"
    else:
        name = check_slug(name_or_file)
        params_file = dirs.params_file(name)
        params = None
        if not params_file.is_file():
            findings.append(
                Finding(
                    "error",
                    f"{label(params_file)}: expected the persona params file that run and "
                    "dry-run read, found no file; write it with "
                    f"`python -m character_training persona new {name} --params-only`",
                )
            )
        else:
            try:
                params = load_params(size, name, overrides, params_dir=dirs.params)
            except ConfigError as exc:
                if str(exc).startswith("unknown model size"):
                    raise
                findings.append(Finding("error", str(exc)))
        if params is None:
            params = size_params(size, name, overrides, dirs)
        path = dirs.resolve_ref(params.constitution_ref)
        scope = f"persona {name!r} via {label(params_file)}"
    file_label = label(path)
    slots: list[Finding] = []
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raw = None  # the loader reports it with the line number
        slots = placeholder_findings(raw, file_label)
    findings += slots
    constitution, loader = _loader_findings(path, skip_placeholder_error=bool(slots))
    findings += loader
    if constitution is not None:
        findings += _content_warnings(constitution, params, file_label)
        if constitution.requires_opt_in and not params.allow_misaligned:
            findings.append(
                Finding(
                    "warning",
                    f"{file_label}: requires_opt_in: runs refuse this persona until "
                    "allow_misaligned is true (in its params file or --set "
                    "allow_misaligned=true)",
                )
            )
        counts = (
            f"{len(constitution.assertions)} assertions, "
            f"{len(constitution.hand_written_prompts())} prompts, "
            f"{len(constitution.examples)} example exchanges"
        )
    elif slots:
        counts = f"{_plural(len(slots), 'field')} still hold placeholders"
    else:
        counts = "does not load"
    summary = (
        f"checking {file_label} ({scope}) at size {params.size}, teacher_few_shot "
        f"{params.teacher_few_shot}: {counts}"
    )
    return CheckReport(file_label, summary, tuple(findings), constitution)


# -- list -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PersonaInfo:
    name: str
    assertions: int | None
    examples: int | None
    requires_opt_in: bool | None
    has_params: bool
    display_name: str = ""
    problem: str = ""


def list_personas(dirs: PersonaDirs = PersonaDirs()) -> list[PersonaInfo]:
    """Every constitution in the folder, counted leniently (any number of prompts), with
    whether its params file exists; a file that does not load carries its one-line error."""
    rows = []
    for name in available_personas(dirs.constitutions):
        has_params = dirs.params_file(name).is_file()
        try:
            c = load_constitution(
                str(dirs.constitution_file(name)), allow_opt_in=True, prompts_per_assertion=None
            )
        except CharacterTrainingError as exc:
            rows.append(PersonaInfo(name, None, None, None, has_params, problem=str(exc)))
            continue
        rows.append(
            PersonaInfo(
                name,
                len(c.assertions),
                len(c.examples),
                c.requires_opt_in,
                has_params,
                c.display_name,
            )
        )
    return rows


def _opt_in(value: bool | None) -> str:
    return "-" if value is None else ("required" if value else "no")


def format_persona_list(rows: Sequence[PersonaInfo]) -> str:
    header = ("persona", "assertions", "examples", "opt-in", "params file", "display name")
    table = [header]
    for row in rows:
        table.append(
            (
                row.name,
                "invalid" if row.assertions is None else str(row.assertions),
                "-" if row.examples is None else str(row.examples),
                "-"
                if row.requires_opt_in is None
                else ("required" if row.requires_opt_in else "no"),
                "yes" if row.has_params else "missing",
                row.display_name,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines += [f"  {row.name}: {row.problem}" for row in rows if row.problem]
    return "\n".join(lines)
