"""Publishing: a self-contained folder of every report, for a blog appendix.

``python -m character_training publish [--out DIR]`` writes (default ``dist/blog-appendix``):

* ``index.html``: every report with its headline numbers (`runner.build_index`);
* ``<persona>/<size>/<notebook>.html``: copies of the reports, made to open offline;
* ``summary.html``: the cross-run summary (`summary.build_summary`);
* ``provenance.html``: per run, the git commits its stage manifests recorded, the resolved
  parameters, seeds, model per role, dates, the `costs` estimate beside what the run's ledger
  says it spent (`spend`, per stage), and which trained checkpoints are kept locally in the
  run folder and which exist only on the service (`weights_archive`); the commit of the tree
  now and the installed versions of torch, transformers, tinker and tinker-cookbook;
* ``bundle.json``: the file list and what was changed to make the copies offline.

Rules the folder keeps, checked on the finished folder before it is moved into place:

* **Offline.** Nothing is fetched when a page opens: no attribute that loads a resource (``src``,
  ``srcset``, ``poster``, ``data``, ``background``, and ``href`` on anything but ``<a>``/``<area>``)
  points to the web, no inline script mentions a web address, no CSS ``url()`` or ``@import``
  does. nbconvert's template loads require.js and MathJax from a CDN and imports mermaid in a
  module script; those elements are removed from the copies (the reports need no JavaScript:
  figures are inlined PNGs, tables are HTML; TeX in markdown shows as source). Links *to*
  external pages in text (``<a href="https://...">``) are kept: they fetch nothing unless the
  reader follows them.
* **Relative links only, all resolving.** Every non-web ``href``/``src`` must name a file inside
  the folder. A report's link to a file that is not published (a repository path mentioned in
  a notebook's markdown) loses its ``href`` and keeps its text; a missing resource is removed.
  Both are listed in ``bundle.json``.
* **No secrets.** If any file matches the Tinker key pattern (``tml-`` followed by 16 or more
  letters, digits, ``_`` or ``-``) or contains the value of ``TINKER_API_KEY`` from the
  environment, nothing is published and the command fails in one line naming the file.
* **No paths of this machine.** A file holding the absolute path of the project root (a
  checkpoint path in a table, a printed run folder, a traceback) is refused the same way: a
  reader cannot open it, and run folders and reports name files relative to themselves.

The folder is built in a temporary sibling and only then replaces ``--out``, so a refused or
failed publish leaves no partial bundle behind; an existing ``--out`` is replaced only when it
is empty or an earlier bundle (it holds ``bundle.json``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .config import MODEL_ROLES, REPO_ROOT
from .errors import CharacterTrainingError, ConfigError, DataError
from .spend import run_line, stage_lines
from .summary import (
    PREFERENCES,
    build_summary,
    discover_runs,
    load_run_params,
    notebook_parameters,
    page,
    params_fingerprint,
    size_key,
    table,
)
from .weights_archive import kept_lines

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "dist" / "blog-appendix"
BUNDLE_FILE = "bundle.json"
PROVENANCE_FILE = "provenance.html"
PACKAGES = ("torch", "transformers", "tinker", "tinker-cookbook", "character-training")
KEY_PATTERN = re.compile(r"tml-[A-Za-z0-9_-]{16,}")
KEY_ENV = "TINKER_API_KEY"
MIN_ENV_SECRET = 8  # shorter env values would match ordinary text by chance

# Attributes that make the browser fetch something when the page opens (href: see below).
RESOURCE_ATTRS = frozenset({"src", "srcset", "poster", "data", "background"})
NAVIGATION_TAGS = frozenset({"a", "area"})  # their href is followed only on a click
REMOTE_SCHEMES = frozenset({"http", "https", "ftp", "file"})
INLINE_SCHEMES = frozenset({"data", "mailto", "javascript", "about", "tel"})
_WEB_ADDRESS = re.compile(r"(?:https?|ftp)://", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?\s*['"]?\s*(?:(?:https?|ftp):)?//[^;]*;?""", re.I)
_CSS_URL = re.compile(r"""url\(\s*['"]?\s*(?:(?:https?|ftp):)?//[^)]*\)""", re.IGNORECASE)


@dataclass
class Published:
    """What `publish` wrote: the folder, counts, and what it changed in the report copies."""

    path: Path
    reports: int
    runs: list[str]
    stripped: list[str] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"published {self.path}: {self.reports} report(s) of {len(self.runs)} run(s), "
            f"index, summary, provenance; {len(self.stripped)} web resource(s) removed, "
            f"{len(self.unlinked)} link(s) to unpublished files unlinked (see {BUNDLE_FILE})"
        )


# -- HTML scanning -------------------------------------------------------------------------------
@dataclass
class _Tag:
    """A start tag with its character offsets; script/style also get their body and end."""

    name: str
    attrs: list[tuple[str, str | None]]
    start: int
    end: int
    self_closing: bool = False
    close: int | None = None
    body: str = ""


class _Scanner(HTMLParser):
    """Start tags with exact offsets, so edits touch only what they change.

    `HTMLParser` reports each tag at its (line, column); turning that into an offset lets the
    sanitiser replace single tags or elements and leave every other byte of nbconvert's page
    as it was, instead of re-serialising a 300 kB document.
    """

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.text = text
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.tags: list[_Tag] = []
        self._open: _Tag | None = None
        self.feed(text)
        self.close()

    def _offset(self) -> int:
        line, column = self.getpos()
        return self.line_starts[line - 1] + column

    def _add(self, tag: str, attrs: list[tuple[str, str | None]], closing: bool) -> _Tag:
        start = self._offset()
        raw = self.get_starttag_text() or ""
        item = _Tag(tag, attrs, start, start + len(raw), self_closing=closing)
        self.tags.append(item)
        return item

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        item = self._add(tag, attrs, False)
        if tag in ("script", "style"):
            self._open = item

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add(tag, attrs, True)

    def handle_endtag(self, tag: str) -> None:
        if self._open is not None and tag == self._open.name:
            position = self._offset()
            end = self.text.find(">", position)
            self._open.body = self.text[self._open.end : position]
            self._open.close = end + 1 if end >= 0 else len(self.text)
            self._open = None


def scan_tags(text: str) -> list[_Tag]:
    return _Scanner(text).tags


def url_kind(value: str) -> str:
    """``remote`` (fetched from elsewhere), ``inline`` (data:, mailto:, a fragment: nothing to
    find), ``absolute-path`` (``/x``: breaks once the folder moves) or ``relative``."""
    value = value.strip()
    if value.startswith("//"):
        return "remote"
    scheme = urlsplit(value).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return "remote"
    if scheme in INLINE_SCHEMES or not value or value.startswith("#"):
        return "inline"
    if scheme:  # an unknown scheme: nothing this folder can provide
        return "remote"
    return "absolute-path" if value.startswith("/") else "relative"


def _targets(name: str, value: str) -> list[str]:
    """The URLs in an attribute (``srcset`` lists several, each with a size)."""
    if name == "srcset":
        return [part.strip().split()[0] for part in value.split(",") if part.strip()]
    return [value]


def _loads(tag: str, name: str) -> bool:
    """Whether attribute ``name`` of ``tag`` is fetched when the page opens."""
    if name in RESOURCE_ATTRS:
        return True
    return name in ("href", "xlink:href") and tag not in NAVIGATION_TAGS


def _is_link(tag: str, name: str) -> bool:
    return _loads(tag, name) or (name == "href" and tag in NAVIGATION_TAGS)


def resolves(value: str, page_file: Path, root: Path) -> bool:
    """Whether a relative URL in ``page_file`` names a file inside ``root``."""
    path = unquote(urlsplit(value).path)
    if not path:
        return True  # "?x" or "#y": the page itself
    target = (page_file.parent / path).resolve()
    try:
        target.relative_to(root.resolve())
    except ValueError:
        return False
    return target.is_file()


def _css_offline(text: str) -> str:
    return _CSS_URL.sub("none", _CSS_IMPORT.sub("", text))


def _render_tag(tag: _Tag, attrs: Sequence[tuple[str, str | None]]) -> str:
    parts = [tag.name] + [
        name if value is None else f'{name}="{html.escape(value, quote=True)}"'
        for name, value in attrs
    ]
    return "<" + " ".join(parts) + (" />" if tag.self_closing else ">")


def make_offline(text: str, page_file: Path, root: Path) -> tuple[str, list[str], list[str]]:
    """The page with everything that would fetch from the web removed and links to files
    outside ``root`` unlinked; returns (text, removed resources, unlinked links)."""
    edits: list[tuple[int, int, str]] = []
    stripped: list[str] = []
    unlinked: list[str] = []
    where = page_file.relative_to(root).as_posix()
    for tag in scan_tags(text):
        if tag.name == "script":
            src = dict(tag.attrs).get("src") or ""
            if (src and url_kind(src) == "remote") or (not src and _WEB_ADDRESS.search(tag.body)):
                what = src or "an inline script that loads code from the web"
                edits.append(
                    (tag.start, tag.close or tag.end, "<!-- removed for offline reading -->")
                )
                stripped.append(f"{where}: script {what}")
                continue
        if tag.name == "style" and tag.close is not None:
            cleaned = _css_offline(tag.body)
            if cleaned != tag.body:
                edits.append((tag.end, tag.end + len(tag.body), cleaned))
                stripped.append(f"{where}: web address in a <style> block")
        if tag.name in ("link", "base"):
            href = dict(tag.attrs).get("href") or ""
            if href and (url_kind(href) in ("remote", "absolute-path") or tag.name == "base"):
                edits.append((tag.start, tag.end, ""))
                stripped.append(f"{where}: <{tag.name}> {href}")
                continue
        kept: list[tuple[str, str | None]] = []
        changed = False
        for name, value in tag.attrs:
            if value is not None and name == "style" and _css_offline(value) != value:
                kept.append((name, _css_offline(value)))
                stripped.append(f"{where}: web address in a style attribute")
                changed = True
                continue
            if value is not None and _is_link(tag.name, name):
                kinds = {url_kind(t) for t in _targets(name, value)}
                broken = any(
                    url_kind(t) == "relative" and not resolves(t, page_file, root)
                    for t in _targets(name, value)
                )
                navigation = tag.name in NAVIGATION_TAGS and name == "href"
                if navigation and ("absolute-path" in kinds or broken):
                    unlinked.append(f"{where}: <a href={value!r}>")
                    changed = True
                    continue
                if not navigation and ({"remote", "absolute-path"} & kinds or broken):
                    stripped.append(f"{where}: <{tag.name} {name}={value[:80]!r}>")
                    changed = True
                    continue
            kept.append((name, value))
        if changed:
            edits.append((tag.start, tag.end, _render_tag(tag, kept)))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text, stripped, unlinked


def link_problems(root: Path) -> list[str]:
    """Every way a page under ``root`` would fetch from the web or point at a missing file.

    Empty for a publishable folder; `publish` runs it on the finished folder.
    """
    root = Path(root)
    problems: list[str] = []
    for page_file in sorted(root.rglob("*.html")):
        where = page_file.relative_to(root).as_posix()
        text = page_file.read_text(encoding="utf-8", errors="replace")
        for tag in scan_tags(text):
            if tag.name == "script" and not dict(tag.attrs).get("src"):
                if _WEB_ADDRESS.search(tag.body):
                    problems.append(f"{where}: an inline script mentions a web address")
            if tag.name == "style" and _css_offline(tag.body) != tag.body:
                problems.append(f"{where}: a <style> block loads from the web")
            for name, value in tag.attrs:
                if value is None:
                    continue
                if name == "style" and _css_offline(value) != value:
                    problems.append(f"{where}: a style attribute loads from the web")
                if not _is_link(tag.name, name):
                    continue
                for target in _targets(name, value):
                    kind = url_kind(target)
                    if kind == "remote" and _loads(tag.name, name):
                        problems.append(f"{where}: <{tag.name} {name}> loads {target}")
                    elif kind == "absolute-path":
                        problems.append(f"{where}: <{tag.name} {name}> uses absolute {target}")
                    elif kind == "relative" and not resolves(target, page_file, root):
                        problems.append(f"{where}: <{tag.name} {name}> target missing: {target}")
    return problems


def find_secrets(root: Path) -> list[str]:
    """Files under ``root`` holding something that looks like a Tinker key (never the key)."""
    secret = os.environ.get(KEY_ENV, "").strip()
    hits = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="ignore")
        where = path.relative_to(root).as_posix()
        if KEY_PATTERN.search(text):
            hits.append(f"{where} matches the Tinker key pattern tml-...")
        elif len(secret) >= MIN_ENV_SECRET and secret in text:
            hits.append(f"{where} contains the value of {KEY_ENV}")
    return hits


def find_machine_paths(root: Path, project_root: Path = REPO_ROOT) -> list[str]:
    """Files under ``root`` that hold the absolute path of ``project_root`` (relative names)."""
    pattern = re.compile(r"(?<![\w.-])" + re.escape(str(project_root)) + r"(?![\w.-])")
    return [
        path.relative_to(root).as_posix()
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file())
        if pattern.search(path.read_text(encoding="utf-8", errors="ignore"))
    ]


# -- provenance ----------------------------------------------------------------------------------
@dataclass
class RunProvenance:
    """Where one run's numbers came from (see `collect_provenance`)."""

    persona: str
    size: str
    has_run_dir: bool
    params: dict[str, Any] | None
    params_source: str
    fingerprints: dict[str, list[str]]  # fingerprint -> files recording it
    commits: dict[str, list[str]]  # git commit -> stages whose manifest recorded it
    started: float | None
    finished: float | None
    papermill: dict[str, dict[str, Any]]  # notebook -> injected parameters but params_json
    stage_configs: dict[str, Any]
    cost: list[str]
    spent: list[str] = field(default_factory=list)  # the ledger: run total, then per stage
    checkpoints: list[str] = field(default_factory=list)  # each kept locally or remote only

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def collect_provenance(runs_dir: Path, persona: str, size: str) -> RunProvenance:
    """Read a run's manifests, summaries and executed notebooks; never raises for bad files."""
    run_dir = Path(runs_dir) / persona / size
    params, source = (None, "no run folder")
    commits: dict[str, list[str]] = {}
    fingerprints: dict[str, list[str]] = {}
    times: list[float] = []
    papermill: dict[str, dict[str, Any]] = {}
    configs: dict[str, Any] = {}
    if run_dir.is_dir():
        params, source = load_run_params(run_dir, persona, size)
        for manifest_file in sorted(run_dir.rglob("manifest.json")):
            manifest = _load_json(manifest_file)
            if not isinstance(manifest, dict):
                continue
            stage = manifest_file.parent.relative_to(run_dir).as_posix()
            commits.setdefault(str(manifest.get("git_commit", "unknown")), []).append(stage)
            times += [t for t in (manifest.get("started"), manifest.get("finished")) if _is_time(t)]
        for summary_file in sorted((run_dir / "summaries").glob("*.json")):
            summary = _load_json(summary_file)
            if isinstance(summary, dict):
                if summary.get("fingerprint"):
                    fingerprints.setdefault(str(summary["fingerprint"]), []).append(
                        f"summaries/{summary_file.name}"
                    )
                if _is_time(summary.get("written")):
                    times.append(float(summary["written"]))
        for notebook in sorted((run_dir / "notebooks").glob("*.ipynb")):
            injected = notebook_parameters(notebook)
            text = injected.pop("params_json", None)
            for known in ("persona", "size"):  # already the run's name
                injected.pop(known, None)
            if isinstance(text, str):
                try:
                    fingerprints.setdefault(params_fingerprint(json.loads(text)), []).append(
                        f"notebooks/{notebook.name} (injected)"
                    )
                except json.JSONDecodeError:
                    pass
            if injected:
                papermill[notebook.stem] = injected
        for config_file in sorted(run_dir.glob("*/config.json")):
            config = _load_json(config_file)
            if config is not None:
                configs[config_file.parent.name] = config
    return RunProvenance(
        persona=persona,
        size=size,
        has_run_dir=run_dir.is_dir(),
        params=params,
        params_source=source,
        fingerprints=fingerprints,
        commits=commits,
        started=min(times) if times else None,
        finished=max(times) if times else None,
        papermill=papermill,
        stage_configs=configs,
        cost=cost_lines(params, Path(runs_dir)) if params else ["no parameters: no estimate"],
        spent=[run_line(run_dir), *stage_lines(run_dir)] if run_dir.is_dir() else [],
        checkpoints=kept_lines(run_dir) if run_dir.is_dir() else [],
    )


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def cost_lines(params: Mapping[str, Any], runs_dir: Path) -> list[str]:
    """The dry-run estimate for a run's parameters (total, price source, prompt lengths).

    It is the planning estimate of `costs` (what ``dry-run`` prints), computed from the
    recorded parameters with stage 01's measured prompt lengths where the run has them; it is
    not a bill. Parameters that no longer load (the schema changed since the run) give a
    one-line reason instead.
    """
    from . import costs
    from .config import params_from_json
    from .store import without_root

    try:
        resolved = params_from_json(json.dumps(params))
        resolved = dataclasses.replace(resolved, runs_dir=str(Path(runs_dir).resolve()))
        lengths = costs.measured_lengths(resolved)
        rows = costs.estimate(resolved, lengths=lengths)
    except (CharacterTrainingError, TypeError) as exc:
        return [f"no estimate: the recorded parameters do not load now ({without_root(str(exc))})"]
    total = costs.total_usd(rows)
    if resolved.backend == "local":
        head = "USD 0.00 (local backend)"
    elif total is None:
        head = "USD n/a (a model has no price in the table)"
    else:
        head = f"about USD {total:.2f} (planning estimate from costs.py, not a bill)"
    return [head, *costs.price_lines(resolved, rows), f"user prompt length: {lengths.source}"]


def package_versions() -> dict[str, str]:
    """Installed versions now (runs do not record them, so this is the publishing machine)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _seeds(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found |= _seeds(value, f"{name}.")
        elif key == "seed" or key.endswith("_seed"):
            found[name] = value
    return found


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def _pre(data: Any) -> str:
    return f"<pre>{html.escape(json.dumps(data, indent=2, sort_keys=True, default=str))}</pre>"


def render_provenance(
    runs: Sequence[RunProvenance], tree_commit: str, versions: Mapping[str, str], bundle_dir: Path
) -> str:
    """The provenance page; links only to reports present in ``bundle_dir``."""
    parts = [
        f"<p>Published {html.escape(_when(time.time()))} from commit "
        f"<code>{html.escape(tree_commit)}</code> of the repository (<code>+dirty</code>: with "
        "uncommitted changes to tracked files).</p>",
        "<h2>Package versions</h2>",
        '<p class="note">Installed on the machine that published this folder; the runs '
        "themselves do not record versions.</p>",
        table(
            ["package", "version"], ([html.escape(k), html.escape(v)] for k, v in versions.items())
        ),
        "<h2>Runs</h2>",
    ]
    rows = []
    for run in runs:
        params = run.params or {}
        models = "<br>".join(
            f"{html.escape(role)}: {html.escape(str(params.get(role, '?')))}"
            for role in MODEL_ROLES
        )
        seeds = ", ".join(f"{k}={v}" for k, v in _seeds(params).items()) or "?"
        commits = "<br>".join(
            f"<code>{html.escape(c)}</code> ({html.escape(', '.join(stages))})"
            for c, stages in run.commits.items()
        )
        reports = sorted((bundle_dir / run.persona / run.size).glob("*.html"))
        first = [r for r in reports if r.stem == PREFERENCES] or reports
        label = html.escape(run.label)
        if first:
            target = first[0].relative_to(bundle_dir).as_posix()
            label = f'<a href="{html.escape(target)}">{label}</a>'
        rows.append(
            [
                f'{label}<br><a href="#{html.escape(_anchor(run))}">parameters</a>',
                html.escape(str(params.get("backend", "?"))),
                models,
                html.escape(seeds),
                html.escape(f"{_when(run.started)} to {_when(run.finished)}"),
                commits or '<span class="missing">no manifests</span>',
                "<br>".join(html.escape(line) for line in run.cost),
                "<br>".join(html.escape(line) for line in run.spent) or "-",
                "<br>".join(html.escape(line) for line in run.checkpoints) or "none recorded",
            ]
        )
    if rows:
        header = ["run", "backend", "models per role", "seeds", "dates", "git commits"]
        header += ["estimated cost", "spent (ledger)", "checkpoints"]
        parts.append(table(header, rows))
    else:
        parts.append("<p>No runs found.</p>")
    for run in runs:
        parts.append(f'<h3 id="{html.escape(_anchor(run))}">{html.escape(run.label)}</h3>')
        parts.append(f"<p>Resolved parameters: {html.escape(run.params_source)}.</p>")
        if run.fingerprints:
            parts.append(
                "<p>Parameter fingerprints recorded: "
                + "; ".join(
                    f"<code>{html.escape(f)}</code> in {html.escape(', '.join(files))}"
                    for f, files in run.fingerprints.items()
                )
                + (
                    " (more than one: notebooks ran with different parameters, e.g. smoke sizes)."
                    if len(run.fingerprints) > 1
                    else "."
                )
                + "</p>"
            )
        if run.papermill:
            parts.append("<p>Other injected notebook parameters:</p>" + _pre(run.papermill))
        if run.params is not None:
            parts.append(
                f"<details><summary>RunParams ({html.escape(params_fingerprint(run.params))})"
                f"</summary>{_pre(run.params)}</details>"
            )
        if run.stage_configs:
            parts.append(
                "<details><summary>Stage settings (each stage's config.json)</summary>"
                f"{_pre(run.stage_configs)}</details>"
            )
    nav = [("index.html", "All reports"), ("summary.html", "Cross-run summary")]
    return page("Provenance", "".join(parts), nav)


def _anchor(run: RunProvenance) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_-]", "-", run.label)


def write_provenance(runs_dir: Path, bundle_dir: Path, reports_dir: Path | None = None) -> Path:
    """Write ``<bundle_dir>/provenance.html`` for every run; returns its path."""
    from .store import git_commit

    pairs = discover_runs(Path(runs_dir), reports_dir)
    runs = [collect_provenance(Path(runs_dir), p, s) for p, s in pairs]
    runs.sort(key=lambda r: (r.persona, size_key(r.size, str((r.params or {}).get("student", "")))))
    target = Path(bundle_dir) / PROVENANCE_FILE
    target.write_text(
        render_provenance(runs, git_commit(REPO_ROOT), package_versions(), Path(bundle_dir)),
        encoding="utf-8",
    )
    return target


# -- the bundle ----------------------------------------------------------------------------------
def _check_out(out: Path, protected: Iterable[Path]) -> None:
    """Refuse an ``--out`` that would overwrite the sources or something not ours."""
    for path in protected:
        path = Path(path).resolve()
        if out == path or out in path.parents or (path != REPO_ROOT and path in out.parents):
            raise ConfigError(
                f"--out {out} would overlap {path}: choose a folder of its own, e.g. {DEFAULT_OUT}"
            )
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_FILE).is_file())
    ):
        raise ConfigError(
            f"--out {out} exists and is not a folder written by publish (no {BUNDLE_FILE}): "
            "choose a new or empty folder"
        )


def _copy_reports(reports_dir: Path, bundle: Path) -> list[Path]:
    copied = []
    for report in sorted(Path(reports_dir).glob("*/*/*.html")):
        target = bundle / report.relative_to(reports_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(report.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
        copied.append(target)
    return copied


def publish(
    out: Path | None = None,
    runs_dir: Path = REPO_ROOT / "runs",
    reports_dir: Path = REPO_ROOT / "reports",
) -> Published:
    """Build the blog-appendix folder (see the module docstring); returns what was written.

    Raises `DataError` (nothing published) when a file holds a key or a page still breaks a
    rule after sanitising, and `ConfigError` for an unusable ``out``.
    """
    from .runner import build_index
    from .store import git_commit

    runs_dir, reports_dir = Path(runs_dir), Path(reports_dir)
    out = Path(out or DEFAULT_OUT).resolve()
    _check_out(out, (runs_dir, reports_dir, REPO_ROOT))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        reports = _copy_reports(reports_dir, work)
        write_provenance(runs_dir, work, reports_dir)
        build_summary(runs_dir, work)
        try:
            build_index(work, runs_dir)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # the index reads headlines
            raise DataError(
                f"cannot build index.html: a file under {runs_dir}/*/*/summaries or "
                f"notebooks/*.status.json is not valid JSON ({exc}); fix or delete it"
            ) from None
        stripped: list[str] = []
        unlinked: list[str] = []
        for page_file in sorted(work.rglob("*.html")):
            text = page_file.read_text(encoding="utf-8")
            cleaned, removed, cut = make_offline(text, page_file, work)
            if cleaned != text:
                page_file.write_text(cleaned, encoding="utf-8")
            stripped += removed
            unlinked += cut
        runs = [f"{p}/{s}" for p, s in discover_runs(runs_dir, reports_dir)]
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
        record = {
            "generated": _when(time.time()),
            "git_commit": git_commit(REPO_ROOT),
            "runs": runs,
            "checkpoints": {run: kept_lines(runs_dir / run) for run in runs},
            "files": files,
            "removed_for_offline_reading": stripped,
            "unlinked": unlinked,
            "rules": (
                "no resource is loaded from the web (links to web pages in text are kept); "
                "every relative link names a file in this folder; no Tinker key; no absolute "
                "path of the machine that published it"
            ),
        }
        (work / BUNDLE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        secrets = find_secrets(work)
        if secrets:
            more = f" (and {len(secrets) - 1} more file(s))" if len(secrets) > 1 else ""
            raise DataError(
                f"refusing to publish: {secrets[0]}{more}; remove the key from the run's "
                "artifacts or reports and publish again"
            )
        machine = find_machine_paths(work)
        if machine:
            more = f" (and {len(machine) - 1} more file(s))" if len(machine) > 1 else ""
            raise DataError(
                f"refusing to publish: {machine[0]}{more} contains the absolute path of the "
                f"project root {REPO_ROOT}; rerun the notebook that wrote it with this version "
                "(reports name files relative to the run folder) and publish again"
            )
        problems = link_problems(work)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"refusing to publish: {problems[0]}{more}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    result = Published(out, len(reports), runs, stripped, unlinked)
    return result


__all__ = [
    "DEFAULT_OUT",
    "KEY_PATTERN",
    "Published",
    "RunProvenance",
    "collect_provenance",
    "cost_lines",
    "find_machine_paths",
    "find_secrets",
    "link_problems",
    "make_offline",
    "package_versions",
    "publish",
    "resolves",
    "url_kind",
    "write_provenance",
]
