"""Persona constitutions: load, validate, import and write them.

A constitution is the only hand-written input of a character-training run: every teacher system
prompt, every generated prompt and every judge question derives from it. A mistake in it does
not crash anything; it quietly turns into bad training data hours later. So loading is strict,
and every problem is reported on one line as ``<file>: <field path>: expected <what>, found
<what>``, which a notebook or the CLI can print as is.

Things refused on purpose, each because it has bitten someone:

* template placeholders such as ``{NAME}`` left in text (the paper's code leaked a literal
  ``{NAME}`` into its training data);
* unquoted YAML scalars that are not strings (``requires_opt_in: "false"`` is a truthy string;
  a prompt ``yes`` parses as a bool);
* duplicate keys (YAML silently keeps the last one) and duplicate prompts (they over-weight one
  situation and leak between splits);
* assertions not written in the first person (the teacher is told "these are your traits");
* personas marked ``requires_opt_in`` (the misaligned case study) loaded without an explicit
  opt-in, so it cannot be trained by accident.

The paper repository's format, a JSON list of ``{"trait", "questions"}`` entries, can be brought
in with `import_upstream` and saved in our schema with `write_constitution_yaml`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from .errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSTITUTIONS_DIR = REPO_ROOT / "constitutions"

MIN_ASSERTIONS = 3
TOP_LEVEL_KEYS = (
    "name",
    "display_name",
    "description",
    "requires_opt_in",
    "assertions",
    "examples",
)
ASSERTION_KEYS = ("id", "text", "prompts")
EXAMPLE_KEYS = ("prompt", "reply")

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# "I", "I'm", "I've", "I’d", "My ...", "Me ..." -- but not "In", "Many" or "Meet".
_FIRST_PERSON = re.compile(r"(?:I|My|Me)\b|I['’]")
# {NAME}, {TRAITS}, {{ NAME }}: upper-case identifiers of two or more characters, so that set
# notation such as {x} or {A} in a mathematical reply is not mistaken for a template slot.
_PLACEHOLDER = re.compile(r"\{\{?\s*[A-Z][A-Z0-9_]+\s*\}\}?")


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assertion:
    """One first-person trait, with the hand-written user prompts that should elicit it."""

    id: str
    text: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One in-persona exchange, shown to the teacher as a few-shot demonstration."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class Constitution:
    """A validated persona. ``source`` records where it came from and is left out of equality,
    so a constitution imported from JSON and reloaded from the YAML it was saved as compare
    equal."""

    name: str
    display_name: str
    description: str
    requires_opt_in: bool
    assertions: tuple[Assertion, ...]
    examples: tuple[Example, ...]
    source: str = field(default="", compare=False)

    @property
    def traits_text(self) -> str:
        """The assertions as a bulleted list, one ``- `` line each, for teacher system prompts."""
        return "\n".join(f"- {a.text}" for a in self.assertions)

    def hand_written_prompts(self) -> list[tuple[str, int, str]]:
        """Every hand-written prompt as ``(assertion_id, index_within_assertion, prompt)``, so
        generated data can be traced back to the trait it was meant to exercise."""
        return [(a.id, i, p) for a in self.assertions for i, p in enumerate(a.prompts)]

    def to_mapping(self) -> dict[str, Any]:
        """The constitution in the YAML schema (plain dicts, lists and scalars)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "requires_opt_in": self.requires_opt_in,
            "assertions": [
                {"id": a.id, "text": a.text, "prompts": list(a.prompts)} for a in self.assertions
            ],
            "examples": [{"prompt": e.prompt, "reply": e.reply} for e in self.examples],
        }


# -- helpers --------------------------------------------------------------------------------------
def _label(path: Path) -> str:
    """How a file is named in messages: relative to the repository when inside it, so messages
    read ``constitutions/x.yaml`` rather than a machine-specific absolute path."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _kind(value: Any) -> str:
    """A short name for the type YAML/JSON produced, as used after 'found'."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _normalized(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


@dataclass(frozen=True)
class _Paths:
    """How field paths are spelled in messages; the upstream importer names its own fields."""

    top: Callable[[str], str]
    entry: Callable[[int], str]
    item: Callable[[int, str], str]


_YAML_PATHS = _Paths(
    top=lambda key: key,
    entry=lambda i: f"assertions[{i}]",
    item=lambda i, key: f"assertions[{i}].{key}",
)
_UPSTREAM_FIELDS = {"text": "trait", "prompts": "questions"}
_UPSTREAM_PATHS = _Paths(
    top=lambda key: "top level" if key == "assertions" else f"{key} argument",
    entry=lambda i: f"[{i}]",
    item=lambda i, key: f"[{i}].{_UPSTREAM_FIELDS.get(key, key)}",
)


class _Checker:
    """Raises the one-line DataError for one file."""

    def __init__(self, label: str, paths: _Paths = _YAML_PATHS) -> None:
        self.label = label
        self.paths = paths

    def fail(self, path: str, expected: str, found: str) -> NoReturn:
        raise DataError(f"{self.label}: {path}: expected {expected}, found {found}")

    def text(self, value: Any, path: str, *, one_line: bool = False) -> str:
        """A non-empty string without template placeholders."""
        what = "a non-empty one-line string" if one_line else "a non-empty string"
        if not isinstance(value, str):
            self.fail(path, what, _kind(value))
        if not value.strip():
            self.fail(path, what, "an empty string")
        if one_line and "\n" in value.strip():
            self.fail(path, what, f"{value.strip().count(chr(10)) + 1} lines")
        slot = _PLACEHOLDER.search(value)
        if slot:
            self.fail(
                path,
                "text with no template placeholders",
                f"{slot.group(0)!r} left in it (fill it in or rephrase)",
            )
        return value

    def keys(self, mapping: dict, allowed: tuple[str, ...], path: str) -> None:
        """Unknown keys first (a typo like ``prompt:`` is clearer than 'prompts missing')."""
        unknown = [str(k) for k in mapping if k not in allowed]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            self.fail(
                path,
                f"only the keys {', '.join(allowed)}",
                f"unknown key{'s' if len(unknown) > 1 else ''} {names}",
            )


# -- validation -----------------------------------------------------------------------------------
def _validate(
    data: Any,
    check: _Checker,
    *,
    stem: str | None,
    prompts_per_assertion: int | None,
) -> tuple[dict[str, Any], list[Assertion], list[Example]]:
    """Check a raw mapping in our schema; return it with its parsed assertions and examples."""
    top, item = check.paths.top, check.paths.item
    if not isinstance(data, dict):
        hint = ""
        if isinstance(data, list) and data and isinstance(data[0], dict) and "trait" in data[0]:
            hint = " (this looks like the upstream format: use import_upstream)"
        check.fail("top level", "a mapping of constitution fields", _kind(data) + hint)
    check.keys(data, TOP_LEVEL_KEYS, "top level")
    for key in TOP_LEVEL_KEYS:
        if key not in data:
            check.fail(top(key), "a value for this required key", "no such key")

    name = data["name"]
    if not isinstance(name, str) or not _SLUG.fullmatch(name):
        found = _short(name) if isinstance(name, str) else _kind(name)
        check.fail(top("name"), "a lowercase slug such as 'sarcastic'", found)
    if stem is not None and name != stem:
        check.fail(top("name"), f"the file stem {stem!r}", repr(name))
    check.text(data["display_name"], top("display_name"), one_line=True)
    check.text(data["description"], top("description"), one_line=True)
    if not isinstance(data["requires_opt_in"], bool):
        check.fail(top("requires_opt_in"), "true or false", _kind(data["requires_opt_in"]))

    raw_assertions = data["assertions"]
    if not isinstance(raw_assertions, list):
        check.fail(
            top("assertions"),
            f"a list of at least {MIN_ASSERTIONS} assertions",
            _kind(raw_assertions),
        )
    if len(raw_assertions) < MIN_ASSERTIONS:
        check.fail(
            top("assertions"),
            f"a list of at least {MIN_ASSERTIONS} assertions",
            str(len(raw_assertions)),
        )

    if prompts_per_assertion is None:
        count_text, list_text = "at least 1 user prompt", "a non-empty list of user prompts"
    else:
        plural = "s" if prompts_per_assertion != 1 else ""
        count_text = f"exactly {prompts_per_assertion} user prompt{plural}"
        list_text = f"a list of {count_text}"
    ids: dict[str, int] = {}
    seen_prompts: dict[str, str] = {}
    assertions: list[Assertion] = []
    for i, raw in enumerate(raw_assertions):
        where = check.paths.entry(i)
        if not isinstance(raw, dict):
            check.fail(where, "a mapping with id, text and prompts", _kind(raw))
        check.keys(raw, ASSERTION_KEYS, where)
        for key in ASSERTION_KEYS:
            if key not in raw:
                check.fail(item(i, key), "a value for this required key", "no such key")
        ident = raw["id"]
        if not isinstance(ident, str) or not _SLUG.fullmatch(ident):
            found = _short(ident) if isinstance(ident, str) else _kind(ident)
            check.fail(item(i, "id"), "a lowercase slug such as 'sharp-wit'", found)
        if ident in ids:
            check.fail(
                item(i, "id"),
                "a unique id",
                f"{ident!r} again (first used by {item(ids[ident], 'id')})",
            )
        ids[ident] = i
        text = check.text(raw["text"], item(i, "text"))
        if not _FIRST_PERSON.match(text.lstrip()):
            check.fail(
                item(i, "text"),
                "a first-person statement starting with 'I', \"I'\", 'My' or 'Me'",
                _short(text.strip(), 40),
            )
        prompts = raw["prompts"]
        if not isinstance(prompts, list):
            check.fail(item(i, "prompts"), list_text, _kind(prompts))
        if prompts_per_assertion is not None and len(prompts) != prompts_per_assertion:
            check.fail(item(i, "prompts"), count_text, str(len(prompts)))
        if not prompts:
            check.fail(item(i, "prompts"), count_text, "an empty list")
        for j, prompt in enumerate(prompts):
            path = f"{item(i, 'prompts')}[{j}]"
            check.text(prompt, path)
            key = _normalized(prompt)
            if key in seen_prompts:
                check.fail(
                    path, "a prompt not already in this file", f"a repeat of {seen_prompts[key]}"
                )
            seen_prompts[key] = path
        assertions.append(Assertion(id=ident, text=text, prompts=tuple(prompts)))

    raw_examples = data["examples"]
    if not isinstance(raw_examples, list):
        check.fail(
            top("examples"),
            "a list of {prompt, reply} mappings (may be empty)",
            _kind(raw_examples),
        )
    examples: list[Example] = []
    for k, raw in enumerate(raw_examples):
        where = f"examples[{k}]"
        if not isinstance(raw, dict):
            check.fail(where, "a mapping with prompt and reply", _kind(raw))
        check.keys(raw, EXAMPLE_KEYS, where)
        for key in EXAMPLE_KEYS:
            if key not in raw:
                check.fail(f"{where}.{key}", "a value for this required key", "no such key")
        prompt = check.text(raw["prompt"], f"{where}.prompt")
        reply = check.text(raw["reply"], f"{where}.reply")
        # A demonstration answering a training prompt would hand the student its target.
        if _normalized(prompt) in seen_prompts:
            check.fail(
                f"{where}.prompt",
                "a prompt that is not also a hand-written prompt",
                f"a repeat of {seen_prompts[_normalized(prompt)]}",
            )
        examples.append(Example(prompt=prompt, reply=reply))
    return data, assertions, examples


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _syntax(problem: str) -> str:
    """Parser messages often begin with 'found'; drop it so 'found found ...' never appears."""
    problem = " ".join(problem.split())
    return f"a syntax error ({problem.removeprefix('found ')})"


def _read_yaml(path: Path, label: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: expected UTF-8 text, found {exc.reason}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise DataError(
            f"{label}: line {exc.line}: expected each key once per mapping, found "
            f"{exc.key!r} twice (YAML would keep only the last one)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "top level"
        problem = _syntax(str(getattr(exc, "problem", None) or exc))
        raise DataError(f"{label}: {where}: expected valid YAML, found {problem}") from None


# -- public API ---------------------------------------------------------------------------------
def available_personas(directory: str | Path = CONSTITUTIONS_DIR) -> list[str]:
    """Sorted slugs of the constitutions in ``directory`` (file stems of ``*.yaml``)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def _resolve(name_or_path: str | Path, directory: Path) -> Path:
    """A slug names ``<directory>/<slug>.yaml``; anything with a suffix or a slash is a path."""
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or "/" in text
        or "\\" in text
        or text.endswith((".yaml", ".yml", ".json"))
    )
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise DataError(
                f"{_label(path)}: expected a constitution YAML file, found no file at this path"
            )
        if path.suffix == ".json":
            raise DataError(
                f"{_label(path)}: expected a constitution YAML file, found JSON "
                "(use import_upstream for the paper's JSON format)"
            )
        return path
    path = directory / f"{text}.yaml"
    if not path.is_file():
        raise DataError(
            f"unknown persona {text!r}: expected one of "
            f"{available_personas(directory)} (files in {_label(directory)})"
        )
    return path


def load_constitution(
    name_or_path: str | Path,
    directory: str | Path = CONSTITUTIONS_DIR,
    *,
    allow_opt_in: bool = False,
    prompts_per_assertion: int | None = 5,
) -> Constitution:
    """Load and validate a constitution given by slug (``"sarcastic"``) or path to a ``.yaml``.

    ``prompts_per_assertion`` pins the number of hand-written prompts per assertion (our shipped
    files have 5, which keeps the traits evenly weighted); ``None`` accepts any number >= 1, as
    imported constitutions have. A persona with ``requires_opt_in: true`` raises `ConfigError`
    unless ``allow_opt_in`` is true. Malformed files raise a one-line `DataError`.
    """
    if prompts_per_assertion is not None and (
        isinstance(prompts_per_assertion, bool)
        or not isinstance(prompts_per_assertion, int)
        or prompts_per_assertion < 1
    ):
        raise ConfigError(
            f"prompts_per_assertion: expected an int >= 1 or None, found {prompts_per_assertion!r}"
        )
    path = _resolve(name_or_path, Path(directory))
    label = _label(path)
    data = _read_yaml(path, label)
    data, assertions, examples = _validate(
        data, _Checker(label), stem=path.stem, prompts_per_assertion=prompts_per_assertion
    )
    constitution = Constitution(
        name=data["name"],
        display_name=data["display_name"],
        description=data["description"],
        requires_opt_in=data["requires_opt_in"],
        assertions=tuple(assertions),
        examples=tuple(examples),
        source=str(path),
    )
    if constitution.requires_opt_in and not allow_opt_in:
        raise ConfigError(
            f"persona {constitution.name!r} is disabled by default because it describes a "
            f"deliberately harmful assistant ({constitution.description.strip().rstrip('.')}): "
            "set allow_misaligned: true in the persona params (allow_opt_in=True when calling "
            "load_constitution) to opt in, knowing its outputs are meant to give bad advice"
        )
    return constitution


def import_upstream(
    path: str | Path,
    name: str,
    description: str,
    display_name: str | None = None,
) -> Constitution:
    """Read a constitution in the paper repository's format and return it in ours.

    The upstream file is a JSON list of ``{"trait": str, "questions": [str, ...]}``; other keys
    (``"clarification"``, ...) are ignored. Traits become assertions ``trait-01``, ``trait-02``,
    ...; questions become their prompts, in any number >= 1. The result passes the same checks
    as a loaded file, with errors naming the upstream entry (``[2].questions``).
    """
    file = Path(path)
    label = _label(file)
    check = _Checker(label, _UPSTREAM_PATHS)
    if not file.is_file():
        raise DataError(
            f"{label}: expected an upstream constitution JSON file, found no file at this path"
        )
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{label}: line {exc.lineno}: expected valid JSON, found {_syntax(exc.msg)}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: expected UTF-8 text, found {exc.reason}") from None
    if not isinstance(entries, list):
        check.fail("top level", 'a JSON list of {"trait", "questions"} entries', _kind(entries))
    width = max(2, len(str(len(entries))))
    raw_assertions = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            check.fail(f"[{i}]", 'an object with "trait" and "questions"', _kind(entry))
        for key, what in (
            ("trait", "a non-empty string"),
            ("questions", "a non-empty list of strings"),
        ):
            if key not in entry:
                check.fail(f"[{i}].{key}", what, "no such key")
        questions = entry["questions"]
        if not isinstance(questions, list):
            check.fail(f"[{i}].questions", "a non-empty list of strings", _kind(questions))
        if not questions:
            check.fail(f"[{i}].questions", "a non-empty list of strings", "an empty list")
        raw_assertions.append(
            {"id": f"trait-{i + 1:0{width}d}", "text": entry["trait"], "prompts": questions}
        )
    if display_name is None and isinstance(name, str):
        display_name = name.replace("-", " ").title()
    data = {
        "name": name,
        "display_name": display_name,
        "description": description,
        "requires_opt_in": False,
        "assertions": raw_assertions,
        "examples": [],
    }
    _, assertions, _ = _validate(data, check, stem=None, prompts_per_assertion=None)
    return Constitution(
        name=name,
        display_name=str(display_name),
        description=description,
        requires_opt_in=False,
        assertions=tuple(assertions),
        examples=(),
        source=str(file),
    )


class _Quoted(str):
    """A string to be written double-quoted, as the shipped files are, so prose with colons or
    leading quotes never needs hand-escaping and never changes type on reload."""


class _Dumper(yaml.SafeDumper):
    """Writes block sequences indented under their key, matching the shipped files."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


_Dumper.add_representer(
    _Quoted,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style='"'),
)


def write_constitution_yaml(constitution: Constitution, path: str | Path) -> Path:
    """Write ``constitution`` in our YAML schema; it loads back equal with
    ``load_constitution(path, prompts_per_assertion=None, allow_opt_in=...)``.

    The constitution is validated first (the file stem must be its name), so a file that would
    not load is never written into ``constitutions/``.
    """
    out = Path(path)
    data = constitution.to_mapping()
    _validate(data, _Checker(_label(out)), stem=out.stem, prompts_per_assertion=None)
    quoted = {
        "name": data["name"],
        "display_name": _Quoted(data["display_name"]),
        "description": _Quoted(data["description"]),
        "requires_opt_in": data["requires_opt_in"],
        "assertions": [
            {
                "id": a["id"],
                "text": _Quoted(a["text"]),
                "prompts": [_Quoted(p) for p in a["prompts"]],
            }
            for a in data["assertions"]
        ],
        "examples": [
            {"prompt": _Quoted(e["prompt"]), "reply": _Quoted(e["reply"])} for e in data["examples"]
        ],
    }
    header = ""
    if constitution.source and Path(constitution.source).suffix not in (".yaml", ".yml"):
        origin = " ".join(Path(constitution.source).name.split())
        header = f"# Converted from {origin} by write_constitution_yaml; edit freely.\n"
    body = yaml.dump(
        quoted,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=1_000_000,
        default_flow_style=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body, encoding="utf-8")
    return out
