"""Turn a generator model's list of user prompts into clean, distinct user prompts.

Stage 01 expands the few hand-written prompts of each constitution assertion into ~50 by
few-shot prompting a generator model. What comes back is chat text, not data: numbered or
bulleted lists, bold labels, quotes, JSON in code fences, a "Sure! Here are 10 more prompts:"
preamble, an "I hope these help!" outro and, when generation hit ``max_tokens``, a last item
cut mid-sentence. A blog replication of character training kept such text almost as is; many
of its "user prompts" were really assistant replies ("Sure, here's a poem..."), flattery aimed
at the assistant ("You're so wise, tell me...") or numbered essay headings ("1. Introduction:
Introduce your thesis"). A model trained to answer those in character learns the wrong thing.

Three pure steps clean the text; each one returns what it threw away with a short reason, so a
notebook can show the losses (the reference code's ``except: continue`` hid them):

1. `parse_generated_prompts`: one generation -> candidate prompts. Format only, no judgement
   on content beyond recognising list chatter by its position.
2. `classify_request` / `filter_requests`: reject candidates that are not plausible user
   messages to an assistant. Cheap regular expressions, tuned to keep false rejections of real
   prompts rare (every prompt shipped in ``data/`` passes); they catch the common failures,
   not every one.
3. `deduplicate`: drop exact and near duplicates, also of prompts that already exist (the
   hand-written examples, an evaluation set); `distinct_records` does it for records that
   carry a prompt.

`FilterReport` adds the reasons up for a table.

Length: the three steps are one pipeline with one vocabulary of drop reasons, which
`FilterReport` counts across all of them; most of the lines are the commented regular
expressions and word lists of steps 1 and 2, which read best next to the code using them.
"""

from __future__ import annotations

import json
import math
import re
import string
import textwrap
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from .errors import ConfigError, DataError

R = TypeVar("R")

# ============================================================================================
# 1. Parsing a generation
# ============================================================================================

PARSE_REASONS = (
    "preamble",  # chatter before the first item ("Sure! Here are 10 more prompts:")
    "closing",  # chatter after the last item ("I hope these help!")
    "interlude",  # chatter between items, separated from them by blank lines
    "heading",  # a section heading grouping items ("**Work:**", "### Travel")
    "markup",  # code fences, lone JSON brackets and horizontal rules around the list
    "empty-item",  # a marker with nothing after it
    "not-a-string",  # a JSON array element that is not a string
    "truncated",  # the last item of a generation cut by max_tokens
)
"""Every reason `parse_generated_prompts` may give for a dropped line."""


@dataclass(frozen=True)
class ParseResult:
    """Prompts found in one generation, and every non-blank line that did not become one.

    ``dropped`` holds ``(text, reason)`` pairs in the order they appear in the generation; the
    text is the stripped source line (for a dropped multi-line item, its lines joined by newlines;
    for a JSON element, the element). Blank lines are the only thing discarded without a record.
    """

    prompts: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...] = ()


# A list marker at the start of a line: "1." "1)" "(1)" "[1]" "#1" "Q1:" "Prompt 3 -" "a)" "iv."
# and bullets, optionally in bold ("**1.**"). Digits are capped at three and must be followed by
# a space or the end of the line, so "1.5 million" and "10:30" are never taken for markers;
# word markers need their punctuation, so "Q3 earnings..." keeps its "Q3".
_MARKER = re.compile(
    r"""^(?P<indent>[ ]*)
    (?:\*\*|__)?
    (?:
        (?P<num> \(\d{1,3}\) | \[\d{1,3}\] | \#?\d{1,3}[.):\]]
               | (?i:q|question|prompt|example|request|item)[ ]*\#?[ ]*\d{1,3}[ ]*[.:)\-–—] )
      | (?P<alpha> (?:[A-Za-z]|[IVX]{2,5}|[ivx]{2,5})[.)] )
      | (?P<bullet> [-*•‣◦▪●·–—+] )
    )
    (?:\*\*|__)?
    (?:[ ]+|$)""",
    re.X,
)

_FENCE = re.compile(r"^[ ]*(```|~~~)[\w+-]*[ ]*$")
# Lines that are pure layout: a lone JSON bracket, or a markdown horizontal rule.
_LAYOUT_LINE = re.compile(r"^[\[\]{}][,;]?$|^(?:-{3,}|\*{3,}|_{3,}|={3,})$")
_MD_HEADING = re.compile(r"^#{1,6}[ ]+\S")
_WHOLLY_BOLD = re.compile(r"^(\*\*|__)(?P<inner>[^*_\n].*?)\1[:.]?$")

# Chatter that opens a plain (unmarked) list. Marked lists need no pattern: whatever comes
# before the first marker is preamble.
_PREAMBLE = re.compile(
    r"""^(?:sure|certainly|of\s+course|absolutely|okay|ok|alright|great|no\s+problem|gladly
      |here(?:'s|\s+is|\s+are|\s+you\s+go)|below\s+(?:are|is)|the\s+following
      |i'?ve\s+(?:written|generated|created|come\s+up)|i\s+have\s+(?:written|generated|created)
      |these\s+are)\b""",
    re.I | re.X,
)

# Chatter that closes a list. Phrased narrowly because a line that matches right after the last
# item is cut from it, and real prompts do say things like "let me know what you think".
_CLOSING = re.compile(
    r"""^(?:i\s+hope\s+(?:these|this|that|they|it)|hope\s+(?:these|this|that|it)\s+helps?
      |these\s+(?:prompts|questions|examples|requests|should|cover|span|vary|range)
      |(?:each|all|any)\s+of\s+(?:these|the\s+above)
      |feel\s+free\s+to|let\s+me\s+know\s+if\s+you(?:'d|\s+would)?\s+(?:like|want|need)
      |would\s+you\s+like\s+(?:me|more|additional|some)|do\s+you\s+want\s+(?:me|more)
      |want\s+me\s+to|shall\s+i
      |i\s+can\s+(?:also\s+)?(?:generate|provide|create|write|make|add|come)
      |happy\s+(?:to\s+help|prompting|writing)|good\s+luck|enjoy!?$|note:|\(note)""",
    re.I | re.X,
)

_LABEL = re.compile(
    r"^(?:user(?:\s+(?:prompt|message|request|query))?|prompt|question|request|query|message|q)"
    r"\s*#?\d*\s*[:\-–—]\s+",
    re.I,
)
_BOLD_LABEL = re.compile(r"^(\*\*|__)(?P<label>[^*_\n]{1,60}?)\1(?P<sep>[ ]*[:\-–—]|[ ]*\n|[ ]+)")
# Paired ** at word edges only, so "2**10" survives; __ only around several words, so
# "__init__" does.
_BOLD_SPAN = re.compile(
    r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])|(?<!\w)__(?=\S)([^_]*?\s[^_]*?)(?<=\S)__(?!\w)"
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»", "„": "“"}


@dataclass
class _Item:
    """A list item being assembled: the text after its marker plus continuation lines."""

    family: str  # "num", "alpha", "bullet" or "plain"
    indent: int
    head: str
    more: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    blank_pending: bool = False
    sublist: str | None = None  # marker family of a sub-list absorbed into this item

    def add(self, line: str) -> None:
        if self.blank_pending and (self.head or self.more):
            self.more.append("")
        self.blank_pending = False
        self.more.append(line)
        self.raw.append(line.strip())

    def text(self) -> str:
        # Dedent the continuation as a block so code indentation inside it survives; a blank
        # line right after the first line is kept as a paragraph break.
        body = textwrap.dedent("\n".join(self.more)).rstrip()
        return f"{self.head}\n{body}".strip() if body.strip() else self.head.strip()


# A parse is a sequence of events in source order: an item, or a dropped line with its reason.
_Event = _Item | tuple[str, str]


def parse_generated_prompts(text: str, *, truncated: bool = False) -> ParseResult:
    """Extract the user prompts from one generator reply.

    Accepts a JSON array of strings (whole reply, fenced block, or a bracketed span inside
    chatter; also ``{"prompts": [...]}``), marked lists (numbers in any style, letters, bullets,
    mixed freely, optionally bold), and plain one-prompt-per-line text. In marked lists a line
    without a marker continues the item above it (multi-line prompts), unless a blank line
    separates it from the items and it is not indented, in which case it is chatter. Plain text
    has no way to tell a wrapped prompt from the next one, so there each line is one prompt.

    Numbering, bullets, bold, wrapping quotes and labels ("**Travel:**", "User:") are removed.
    With ``truncated=True`` (the generation stopped at max_tokens) the last item is dropped as
    "truncated" when nothing follows it, since it may be cut mid-sentence. Content is not
    judged here; `filter_requests` does that.
    """
    if not isinstance(text, str):
        raise DataError(
            f"parse_generated_prompts expected the generated text as str, got "
            f"{type(text).__name__}; pass the sample's decoded text (use '' for an empty one)."
        )
    lines = text.expandtabs(4).splitlines()
    events = _parse_json(lines)
    if events is None:
        events = _parse_list(lines) if _has_markers(lines) else _parse_plain(lines)
    return _finish(events, truncated=truncated)


def _finish(events: list[_Event], *, truncated: bool) -> ParseResult:
    # A JSON array that parsed has its closing bracket, so its last element is complete.
    if truncated and events and isinstance(events[-1], _Item) and events[-1].family != "json":
        last = events.pop()
        events.append(("\n".join(last.raw), "truncated"))
    prompts: list[str] = []
    dropped: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, _Item):
            prompt = _clean_item(event.text())
            if prompt:
                prompts.append(prompt)
            else:
                dropped.append(("\n".join(event.raw), "empty-item"))
        else:
            dropped.append(event)
    return ParseResult(tuple(prompts), tuple(dropped))


# --- JSON ------------------------------------------------------------------------------------


def _parse_json(lines: list[str]) -> list[_Event] | None:
    """Events for a reply holding a JSON list of prompts, or None if it holds none.

    Tried in order: the whole reply, each fenced block, the span from the first line opening a
    bracket to the last line closing one. Lines around the JSON are preamble/closing chatter.
    """
    n = len(lines)
    spans: list[tuple[int, int, int, int]] = [(0, n, 0, n)]  # (outer_start, outer_end, json...)
    i = 0
    while i < n:
        if _FENCE.match(lines[i]) and not lines[i].startswith(" "):
            j = next((k for k in range(i + 1, n) if _FENCE.match(lines[k])), None)
            if j is None:
                break
            spans.append((i, j + 1, i + 1, j))
            i = j + 1
        else:
            i += 1
    opens = [k for k, line in enumerate(lines) if line.strip()[:1] in "[{"]
    closes = [k for k, line in enumerate(lines) if line.strip()[-1:] in "]}"]
    if opens and closes and closes[-1] >= opens[0]:
        spans.append((opens[0], closes[-1] + 1, opens[0], closes[-1] + 1))

    for outer_start, outer_end, start, end in spans:
        items = _json_prompt_list("\n".join(lines[start:end]))
        if items is None:
            continue
        events: list[_Event] = []
        events += [(s, "preamble") for s in _nonblank(lines[:outer_start])]
        events += [(s, "markup") for s in _nonblank(lines[outer_start:start])]
        for item in items:
            if isinstance(item, str):
                events.append(_Item("json", 0, _strip_marker(item), raw=[item.strip() or '""']))
            else:
                events.append((json.dumps(item, ensure_ascii=False), "not-a-string"))
        events += [(s, "markup") for s in _nonblank(lines[end:outer_end])]
        events += [(s, "closing") for s in _nonblank(lines[outer_end:])]
        return events
    return None


def _json_prompt_list(blob: str) -> list | None:
    if not blob.strip():
        return None
    try:
        value = json.loads(blob)
    except ValueError:
        return None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    if not isinstance(value, list) or not value:
        return None
    if not any(isinstance(v, str) for v in value):
        return None
    return value


def _nonblank(lines: Iterable[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


# --- marked lists ----------------------------------------------------------------------------


def _marker(line: str) -> tuple[str, int, str] | None:
    """(family, indent, text after the marker) for a marker line, else None."""
    m = _MARKER.match(line)
    if m is None:
        return None
    family = "num" if m.group("num") else "alpha" if m.group("alpha") else "bullet"
    return family, len(m.group("indent")), line[m.end() :].strip()


def _strip_marker(text: str) -> str:
    found = _marker(text.strip())
    return found[2] if found else text.strip()


def _has_markers(lines: list[str]) -> bool:
    return any(_marker(line) for line in lines)


def _is_heading_line(stripped: str) -> bool:
    """A markdown heading, or a wholly bold line that is a label rather than a sentence."""
    if _MD_HEADING.match(stripped):
        return True
    m = _WHOLLY_BOLD.match(stripped)
    return bool(m) and not m.group("inner").rstrip().endswith(("?", "!", "."))


def _is_title_phrase(stripped: str) -> bool:
    """A few words ending in a colon that name a topic ("Career questions:") rather than
    start a sentence ("My constraints are:")."""
    if not stripped.endswith(":"):
        return False
    words = re.findall(r"[\w']+", stripped.lower())
    return (
        len(words) <= 6
        and not any(w in _SENTENCE_CUES for w in words)
        and not any(c in stripped[:-1] for c in ".?!")
    )


def _looks_like_group_title(text: str) -> bool:
    """Item text that only names a group of items ("**Work**", "Career questions:")."""
    stripped = text.strip()
    return bool(stripped) and (_is_heading_line(stripped) or _is_title_phrase(stripped))


def _wrapping_fence(lines: list[str]) -> set[int]:
    """Indices of an unindented code fence pair wrapping the whole list (not one inside it)."""
    for i, line in enumerate(lines):
        if _marker(line):
            return set()
        if _FENCE.match(line) and not line.startswith(" "):
            close = next(
                (
                    k
                    for k in range(i + 1, len(lines))
                    if _FENCE.match(lines[k]) and not lines[k].startswith(" ")
                ),
                None,
            )
            return {i} if close is None else {i, close}
    return set()


def _parse_list(lines: list[str]) -> list[_Event]:
    fence = _wrapping_fence(lines)
    markers = [_marker(line) for line in lines]
    last_marker = max(i for i, m in enumerate(markers) if m)
    events: list[_Event] = []
    current: _Item | None = None  # the item that non-marker lines would continue
    seen_item = False
    gap = False  # a blank line since the last non-blank one
    closing = False

    def close_item() -> None:
        nonlocal current
        if current is not None:
            events.append(current)
        current = None

    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            gap = True
            if current is not None:
                current.blank_pending = True
            continue
        was_gap, gap = gap, False
        indent = len(line) - len(line.lstrip(" "))
        if i in fence or (indent == 0 and _LAYOUT_LINE.match(stripped)):
            close_item()
            events.append((stripped, "markup"))
            continue
        if closing:
            events.append((stripped, "closing"))
            continue
        found = markers[i]
        if found and _starts_item(found, current):
            family, m_indent, head = found
            if (
                current is not None
                and m_indent > current.indent
                and _looks_like_group_title(current.text())
            ):
                events.append(("\n".join(current.raw), "heading"))
                current = None
            close_item()
            current = _Item(family, m_indent, head, raw=[stripped])
            seen_item = True
            continue
        if found and current is not None and found[1] <= current.indent + 1:
            current.sublist = found[0]  # a same-depth sub-list; its later markers follow suit
        if current is None or (not current.head and not current.more):
            if current is None:
                reason = (
                    "heading"
                    if _is_heading_line(stripped)
                    else ("interlude" if seen_item else "preamble")
                )
                if seen_item and i > last_marker:
                    reason = "closing"
                    closing = True
                events.append((stripped, reason))
            else:  # "Prompt 3:" alone on its line; the prompt follows, even after a blank
                current.add(line)
            continue
        unindented = indent <= current.indent
        if unindented and i > last_marker and _CLOSING.match(_clean_item(stripped)):
            close_item()
            closing = True
            events.append((stripped, "closing"))
            continue
        if unindented and (
            was_gap or _is_heading_line(stripped) or _introduces_next_item(lines, markers, i)
        ):
            close_item()
            if was_gap and i > last_marker:
                closing = True
                events.append((stripped, "closing"))
            elif _is_heading_line(stripped) or _is_title_phrase(stripped):
                events.append((stripped, "heading"))
            else:
                events.append((stripped, "interlude"))
            continue
        current.add(line)
    close_item()
    return events


def _starts_item(found: tuple[str, int, str], current: _Item | None) -> bool:
    """Whether a marker line starts a new item or belongs to the current one.

    Deeper-indented markers are sub-points of the current item, except under a group title.
    At the same depth, letters under a numbered item are sub-points ("a) ... b) ..."), and so
    are bullets right after an item that ends with a colon ("My constraints are:") and every
    later marker of a sub-list already begun.
    """
    if current is None:
        return True
    family, indent, _ = found
    if indent > current.indent + 1:
        return _looks_like_group_title(current.text())
    if family == current.family:
        return True
    if family == current.sublist:
        return False
    if current.family in ("num", "bullet") and family == "alpha":
        return False
    return not (current.family == "num" and family == "bullet" and current.text().endswith(":"))


def _introduces_next_item(lines: list[str], markers: list, i: int) -> bool:
    """A short unmarked line ending in ':' right before a marker line titles the next items."""
    if not _is_title_phrase(lines[i].strip()):
        return False
    following = next((k for k in range(i + 1, len(lines)) if lines[k].strip()), None)
    return following is not None and markers[following] is not None


# --- plain lists -----------------------------------------------------------------------------


def _parse_plain(lines: list[str]) -> list[_Event]:
    fence = _wrapping_fence(lines)
    events: list[_Event] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            continue
        if i in fence or _LAYOUT_LINE.match(stripped):
            events.append((stripped, "markup"))
        elif _is_heading_line(stripped):
            events.append((stripped, "heading"))
        else:
            events.append(_Item("plain", 0, stripped, raw=[stripped]))
    # Chatter can only be recognised by its wording here: leading lines that announce the list,
    # trailing lines that sign off.
    for k, event in enumerate(events):
        if not isinstance(event, _Item):
            continue
        head = _clean_item(event.head)
        if head.endswith(":") or (_PREAMBLE.match(head) and "?" not in head):
            events[k] = (event.head, "preamble")
            continue
        break
    for k in range(len(events) - 1, -1, -1):
        event = events[k]
        if not isinstance(event, _Item):
            continue
        if _CLOSING.match(_clean_item(event.head)):
            events[k] = (event.head, "closing")
            continue
        break
    return events


# --- item text -------------------------------------------------------------------------------


def _clean_item(text: str) -> str:
    """Remove labels, bold and wrapping quotes around a prompt, repeatedly (they nest)."""
    previous = None
    text = text.strip()
    while text != previous:
        previous = text
        text = _strip_labels(text)
        text = _BOLD_SPAN.sub(lambda m: m.group(1) or m.group(2), text)
        text = _strip_wrapping(text).strip()
    return text


def _strip_labels(text: str) -> str:
    m = _BOLD_LABEL.match(text)
    if m:
        label = m.group("label").strip()
        rest = text[m.end() :].strip()
        separated = label.endswith(":") or m.group("sep").strip(" ") != ""
        if rest and separated and len(label.split()) <= 6 and not label.endswith(("?", "!", ".")):
            return rest
    m = _LABEL.match(text)
    if m and text[m.end() :].strip():
        return text[m.end() :].strip()
    return text


def _strip_wrapping(text: str) -> str:
    """Drop one pair of quotes (with a JSON-style trailing comma) or emphasis around the text."""
    body = text[:-1].rstrip() if text.endswith(",") and len(text) > 1 else text
    if len(body) >= 2:
        opener, closer = body[0], body[-1]
        if _QUOTE_PAIRS.get(opener) == closer:
            inner = body[1:-1]
            if opener == '"':
                try:
                    decoded = json.loads(body)
                    if isinstance(decoded, str):
                        return decoded
                except ValueError:
                    pass
                return inner if '"' not in inner else text
            if opener == "'":  # apostrophes may sit inside; spaces inside mean two quotes
                return text if inner[:1].isspace() or inner[-1:].isspace() else inner
            return inner if opener not in inner else text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "*_`" and text[1] != text[0]:
        return text[1:-1]
    return text


# ============================================================================================
# 2. Is it a user request?
# ============================================================================================

REQUEST_REASONS = (
    "too-short",
    "too-long",
    "placeholder",
    "meta",
    "not-english-text",
    "assistant-reply",
    "flattery-to-assistant",
    "heading",
)
"""Reason codes of `classify_request`, in the order they are checked (first match wins)."""

MIN_WORDS = 2
MIN_CHARS = 8
MAX_WORDS = 150
"""Length bounds. Two words / eight characters keeps "Why is the sky blue?" and "Why not?" while
rejecting fragments ("Hi!", "Travel"). 150 words is half again the longest prompt shipped in
this repository (102 words); generated items longer than that are essays or replies."""

_PLACEHOLDER_I = re.compile(
    r"""\{\{[^{}]*\}\}
      | (?<![\w'"`$])\{\s*(?:insert|your|name|topic|user|placeholder)\b[A-Za-z' ]*\}
      | (?<![\w\]])\[\s*(?:insert|your|name|topic|placeholder|add|enter|fill|specific|describe
              |user|company|product|city|country|date|number|person|blank|subject)\b[A-Za-z' ]*\]
      | <\s*(?:prompt|user|question|name|topic|insert|placeholder|input|your)\b[A-Za-z' ]*>
      | \blorem\s+ipsum\b""",
    re.I | re.X,
)
# Case matters here: "{NAME}" is a template slot. Lowercase slots above are only taken outside
# code-like context, since f'{name}' or `${user}` may be the subject of a coding question.
# Blanks ("____") are left alone: "Fill in the blank: ..." is a real request.
_PLACEHOLDER_CASE = re.compile(r"\{[A-Z][A-Z0-9_]+\}|<[A-Z][A-Z0-9_]+>|\bX{3,}\b")

_FUNCTION_WORDS = frozenset(
    "a an the to of in on for with and or but is are was be it this that these my me i you your "
    "we our what how why when where which who can could would should do does please".split()
)
# Verbs that open a request about a formula or a snippet ("Integrate 1/(x^2 + 4) dx").
_IMPERATIVES = frozenset(
    "solve simplify integrate differentiate compute calculate evaluate factor expand prove "
    "explain fix debug convert translate refactor optimize optimise find derive plot graph "
    "rewrite review check".split()
)
_CODE_SYMBOLS = frozenset("{}[]();=<>/\\|$#%^&*`+'\"")

_OPENER_STRIP = " \t\n\"'“”‘’*_>#-"

_META = re.compile(
    r"""^(?:(?:sure|okay|ok|certainly|great|alright)[!,.]?\s+)?
        (?:here\s+are|here're|below\s+are|the\s+following\s+(?:are|is)|these\s+are|(?:some\s+)?more
          |additional|another\s+(?:set|batch|list)\s+of|a\s+(?:list|set|batch)\s+of)
        \b[^.?!]{0,40}?\b(?:prompts?|questions|examples|requests|queries|user\s+messages)\b
      | ^(?:prompt|question|example|request)\s*\#?\s*\d+\b
      | ^(?:these|those|the\s+above|all\s+(?:of\s+)?these|each\s+of\s+these)\s+
        (?:prompts|questions|examples|requests)\b
      | \b(?:user\s+prompts|prompts\s+(?:above|below)|in\s+the\s+same\s+style\s+as\s+the
          |similar\s+to\s+the\s+(?:examples|ones\s+(?:above|provided)))\b""",
    re.I | re.X,
)

_ASSISTANT_OPENING = re.compile(
    r"""^(?:sure(?![\w-])|certainly\b|of\s+course\b|absolutely(?![\w-])|definitely!|gladly\b
      |(?:great|good|excellent|interesting|fantastic|what\s+a\s+(?:great|good|wonderful))\s+question
      |(?:that's|that\s+is|this\s+is)\s+(?:a|an|such\s+a)\s+(?:great|good|excellent|interesting
          |fascinating|wonderful)\s+question
      |i'?d\s+be\s+(?:happy|glad|delighted)\s+to|i\s+would\s+be\s+(?:happy|glad|delighted)\s+to
      |i'?m\s+(?:happy|glad|delighted)\s+to\s+(?:help|assist|explain)
      |as\s+an?\s+(?:ai|artificial|language\s+model|large\s+language|llm|assistant)\b
      |i'?m\s+(?:sorry|afraid),?\s+but\s+i\s+(?:can(?:'t|not)|am\s+(?:not\s+able|unable)|won'?t)
      |i\s+apologi[sz]e,?\s+but\s+i|unfortunately,?\s+i\s+(?:can(?:'t|not)|am\s+unable)
      |i\s+can(?:'t|not)\s+(?:help|assist|provide|fulfill|comply)\s+with
      |(?:hello|hi|hey)(?:\s+there)?[!,.]*\s+how\s+(?:can|may)\s+i
      |how\s+(?:can|may)\s+i\s+(?:help|assist)\s+you
      |thank\s+you\s+for\s+(?:asking|sharing|your\s+question|reaching)|thanks\s+for\s+asking
      |(?:okay|ok|alright|all\s+right),?\s+here(?:'s|\s+is|\s+are)
      |in\s+conclusion\b)""",
    re.I | re.X,
)
# "Here's a poem..." is a reply; "Here's my draft, can you fix it?" is a request. The second
# kind speaks in the first person, asks something, or addresses "you".
_HERE_IS = re.compile(r"^here(?:'s|\s+is|\s+are)\s+(?:a|an|some|your|the\s+\w+ed\b|\d+)\b", re.I)
_REQUEST_CUES = re.compile(
    r"\?|\b(?:i|i'm|i've|my|me|we|our|can\s+you|could\s+you|please"
    r"|for\s+you)\b",
    re.I,
)

_STRONG_PRAISE = r"(?:amazing|brilliant|a\s+genius|genius|wonderful|awesome|incredible|fantastic)"
_MILD_PRAISE = (
    r"(?:smart|wise|clever|helpful|intelligent|good|great|kind|knowledgeable"
    r"|insightful|talented|perfect|thoughtful|funny)"
)
_INTENSIFIER = r"(?:so|such\s+an?|really|truly|incredibly|amazingly|extremely|super|always\s+so)"
# "If you're so smart, why..." is a challenge, not praise: hence the look-behinds.
_FLATTERY = re.compile(
    rf"""(?<!if\s)\byou(?:'re|\s+are)\s+(?:{_INTENSIFIER}\s+)?(?:an?\s+)?{_STRONG_PRAISE}\b
      | (?<!if\s)\byou(?:'re|\s+are)\s+{_INTENSIFIER}\s+(?:an?\s+)?{_MILD_PRAISE}\b
      | (?<!if\s)\byou(?:'re|\s+are)\s+the\s+(?:best|smartest|wisest|greatest|most\s+\w+)
        (?=\s*(?:[,.!;]|$|ai\b|assistant\b|chatbot\b|bot\b|ever\b|at\b))
      | \byou(?:'re|\s+are)\s+my\s+(?:favou?rite|best)\b
      | \bi\s+(?:just\s+|really\s+)?(?:love|adore|admire)\s+(?:how|the\s+way|that)\s+you\b
      | \bi\s+(?:just\s+|really\s+)?(?:love|adore|admire)\s+your\s+(?:wisdom|intelligence|brilliance
        |insights?|answers|responses|mind|genius|explanations)\b
      | \byour\s+(?:wisdom|brilliance|genius|intelligence|insight(?:s|fulness)?)\s+
        (?:is|are|never|always)\b
      | \bno\s+one\s+(?:else\s+)?(?:understands|gets|helps)\s+me\s+like\s+you
      | \b(?:smartest|wisest|best|greatest|most\s+(?:brilliant|intelligent|helpful))\s+
        (?:ai|assistant|chatbot|bot|model)\b
      | \boh\s+(?:wise|great|mighty|brilliant)\s+(?:one|ai|assistant|oracle)\b""",
    re.I | re.X,
)

_HEADING_PREFIX = re.compile(
    r"""^(?:introduction|conclusion|summary|overview|background|abstract|outline
      |thesis(?:\s+statement)?|body(?:\s+paragraph)?(?:\s+\d+)?|counter-?arguments?|rebuttal
      |references|bibliography|key\s+(?:points|takeaways|findings)|main\s+points?|objectives?
      |methodology|methods|results|discussion|appendix|recommendations?|call\s+to\s+action|hook
      |topic\s+sentence|(?:step|part|section|chapter|phase|stage|point|paragraph|slide|module
      |lesson|week|day)\s+\d+|[IVX]{1,5}\.)\s*(?:[:\-–—.)]|$)""",
    re.I | re.X,
)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'd|my|me|we|our|us)\b", re.I)
_SMALL_WORDS = frozenset(
    "a an the of in on at by for to from with and or vs via as into over under about".split()
)
_SENTENCE_CUES = frozenset(
    """i i'm me my you your we our us can could would should will shall is are was were be am do
    does did have has had how what why when where who which whose please help tell write explain
    give make show need want let think know feel keep get find describe list compare""".split()
)


def classify_request(text: str) -> str | None:
    """None if ``text`` reads like a message a user would send an assistant, else a reason.

    Checks run in `REQUEST_REASONS` order and the first that fires names the reason:

    * ``too-short`` / ``too-long``: under 2 words or 8 characters; over 150 words.
    * ``placeholder``: template leftovers ("{NAME}", "[insert topic]", "<prompt>", "XXX").
    * ``meta``: talks about the prompt list ("Here are more prompts", "Prompt 12").
    * ``not-english-text``: mostly symbols, a non-Latin script, fewer than two words with
      letters, or code with no prose around it. Other Latin-script languages pass.
    * ``assistant-reply``: opens like an answer ("Sure", "Certainly", "As an AI", "Here's a
      poem..." without any sign of a request).
    * ``flattery-to-assistant``: praise aimed at the assistant ("You're so wise", "I love how
      you..."). Role-play setups ("You are a wise old wizard...") are not praise.
    * ``heading``: an outline or section heading ("Introduction: ...", "Step 3:", a line ending
      in a colon, or a Title Case phrase with no verb and no question mark).
    """
    stripped = text.strip()
    words = re.findall(r"\w+", stripped)
    if len(words) < MIN_WORDS or len(stripped) < MIN_CHARS:
        return "too-short"
    if len(words) > MAX_WORDS:
        return "too-long"
    if _PLACEHOLDER_I.search(stripped) or _PLACEHOLDER_CASE.search(stripped):
        return "placeholder"
    opening = stripped.lstrip(_OPENER_STRIP)
    if _META.search(opening):
        return "meta"
    if _mostly_not_text(stripped, words):
        return "not-english-text"
    if _ASSISTANT_OPENING.match(opening) or (
        _HERE_IS.match(opening) and not _REQUEST_CUES.search(opening)
    ):
        return "assistant-reply"
    if _FLATTERY.search(stripped):
        return "flattery-to-assistant"
    if _is_heading(opening):
        return "heading"
    return None


def _mostly_not_text(text: str, words: list[str]) -> bool:
    chars = [c for c in text if not c.isspace()]
    letters = [c for c in chars if c.isalpha()]
    # Digits count as text so that "Simplify (2x^2 - 8) / (x - 2)." is not symbol soup.
    if len(letters) + sum(c.isdigit() for c in chars) < 0.5 * len(chars):
        return True
    if sum(1 for w in words if any(c.isalpha() for c in w)) < 2:
        return True
    latin = sum(1 for c in letters if c.isascii() or "LATIN" in unicodedata.name(c, ""))
    if latin < 0.5 * len(letters):
        return True
    symbols = sum(1 for c in chars if c in _CODE_SYMBOLS)
    if symbols < 3 or symbols < 0.08 * len(chars) or text.endswith((".", "?", "!")):
        return False
    return not {w.lower() for w in words} & (_FUNCTION_WORDS | _IMPERATIVES)


def _is_heading(text: str) -> bool:
    if text.endswith(":"):
        return True
    if _HEADING_PREFIX.match(text) and not _FIRST_PERSON.search(text) and not text.endswith("?"):
        return True
    if text.endswith(("?", ".", "!")):
        return False
    words = re.findall(r"[A-Za-z][A-Za-z'’-]*", text)
    if not 2 <= len(words) <= 12 or any(w.lower() in _SENTENCE_CUES for w in words):
        return False
    content = [w for w in words if w.lower() not in _SMALL_WORDS]
    capitalised = sum(1 for w in content if w[0].isupper())
    return len(content) >= 2 and capitalised >= 0.8 * len(content)


class FilterOutcome(NamedTuple):
    """Result of `filter_requests`; unpacks as ``kept, rejected``."""

    kept: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]


def filter_requests(prompts: Iterable[str]) -> FilterOutcome:
    """Split prompts into those `classify_request` accepts and ``(prompt, reason)`` rejects."""
    kept: list[str] = []
    rejected: list[tuple[str, str]] = []
    for prompt in prompts:
        reason = classify_request(prompt)
        if reason is None:
            kept.append(prompt)
        else:
            rejected.append((prompt, reason))
    return FilterOutcome(tuple(kept), tuple(rejected))


# ============================================================================================
# 3. Duplicates
# ============================================================================================

DEDUP_REASONS = ("duplicate", "near-duplicate", "existing")
"""``duplicate``: same text after `normalize_prompt`; ``near-duplicate``: similarity at or above
the threshold with an earlier kept prompt; ``existing``: same or similar to an ``against``
prompt."""

SHINGLE_SIZE = 4
"""Character n-gram length for `similarity`.

Character 4-grams rather than word 3-shingles because prompts are short: swapping one word
replaces three word 3-shingles but only about (word length + 3) of a prompt's 30-150 character
4-grams. Measured on pairs differing in one word: a 29-word prompt scores 0.89 with 4-grams
(0.81 with word 3-shingles), a 17-word one 0.79 (0.67), a 6-word one 0.65 (0.60). Different
requests on one topic ("What flour is best for sourdough bread?" / "How long should sourdough
bread proof in the fridge?") score about 0.2, and the ~1,000 distinct prompts shipped in this
repository peak at 0.78 ("What is the capital of Australia?" / "What's the capital of
Australia?"). So the default 0.8 removes one-word edits of prompts of about 20 words or more
and light rewordings; short paraphrases survive it, and lowering the threshold to ~0.6 starts
merging different requests ("ask my boss for a raise" / "for time off" score 0.60)."""

_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»…¿¡–— \t\n"
_TYPOGRAPHIC = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-"})


@dataclass(frozen=True)
class DedupResult:
    """Prompts kept in input order, and ``(removed prompt, prompt it duplicates)`` pairs.

    ``reasons[i]`` says why ``removed[i]`` went (see `DEDUP_REASONS`); the second element of a
    removed pair is the earlier kept prompt or the ``against`` prompt it matched.
    """

    kept: tuple[str, ...]
    removed: tuple[tuple[str, str], ...]
    reasons: tuple[str, ...] = ()


def normalize_prompt(text: str) -> str:
    """Lowercase, unify typographic quotes and dashes, collapse whitespace, trim end punctuation.

    Two prompts with equal normal forms are the same request typed differently.
    """
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHIC).casefold()
    return " ".join(text.split()).strip(_EDGE_PUNCTUATION)


def shingles(text: str, size: int = SHINGLE_SIZE) -> frozenset[str]:
    """Character ``size``-grams of the normalised words of ``text`` (inner punctuation ignored).

    Text shorter than ``size`` is its own single shingle, so it still matches itself.
    """
    flat = " ".join(re.findall(r"\w+", normalize_prompt(text)))
    if len(flat) <= size:
        return frozenset([flat])
    return frozenset(flat[i : i + size] for i in range(len(flat) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|, with two empty sets counted as identical."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the character 4-gram sets of two prompts (0 to 1)."""
    return jaccard(shingles(a), shingles(b))


class _Index:
    """Prompts seen so far, searchable by normal form and by shingle similarity.

    Exact search without comparing every pair ("prefix filtering"): order all shingles from
    rarest to commonest. If Jaccard(A, B) >= t, then |A & B| >= ceil(t * |A|), so the rarest
    shared shingle lies within the first |A| - ceil(t * |A|) + 1 shingles of A, and likewise of
    B. Indexing only those prefixes yields every qualifying pair as a candidate; the candidates
    are then checked in full, oldest first, so the answer is the same as a scan over all
    entries. Rare shingles have short postings, which is what makes it fast (3,000 prompts in
    well under a second instead of ~10 s).
    """

    def __init__(self, rank: dict[str, int], threshold: float) -> None:
        self.rank = rank
        self.threshold = threshold
        self.exact: dict[str, int] = {}
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}

    def _prefix(self, grams: frozenset[str]) -> list[str]:
        # The epsilon keeps float error (0.8 * 5 = 4.000000000000001) from shortening it.
        needed = math.ceil(self.threshold * len(grams) - 1e-9)
        return sorted(grams, key=self.rank.__getitem__)[: len(grams) - needed + 1]

    def add(self, normal: str, grams: frozenset[str]) -> int:
        index = len(self.sets)
        self.exact.setdefault(normal, index)
        self.sets.append(grams)
        for gram in self._prefix(grams):
            self.postings.setdefault(gram, []).append(index)
        return index

    def find(self, normal: str, grams: frozenset[str]) -> tuple[int, bool] | None:
        """(index of the oldest match, exact?) or None."""
        if normal in self.exact:
            return self.exact[normal], True
        candidates: set[int] = set()
        for gram in self._prefix(grams):
            candidates.update(self.postings.get(gram, ()))
        for index in sorted(candidates):
            if jaccard(grams, self.sets[index]) >= self.threshold:
                return index, False
        return None


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(
            f"dedup threshold must be in (0, 1], got {threshold!r}; 0.8 removes one-word edits "
            f"of prompts of ~20+ words, 1.0 only identical 4-gram sets."
        )


def _match_all(
    prompts: Sequence[str], threshold: float, against: Sequence[str]
) -> list[tuple[str, int] | None]:
    """For each prompt: None if kept, else (reason, index into prompts or against)."""
    _check_threshold(threshold)
    ref_forms = [(normalize_prompt(p), shingles(p)) for p in against]
    forms = [(normalize_prompt(p), shingles(p)) for p in prompts]
    frequency = Counter(gram for _, grams in ref_forms + forms for gram in grams)
    rank = {gram: r for r, (gram, _) in enumerate(sorted(frequency.items(), key=_rarest_first))}
    existing = _Index(rank, threshold)
    for normal, grams in ref_forms:
        existing.add(normal, grams)
    kept = _Index(rank, threshold)
    kept_at: list[int] = []  # kept index -> position in prompts
    matches: list[tuple[str, int] | None] = []
    for position, (normal, grams) in enumerate(forms):
        hit = existing.find(normal, grams)
        if hit is not None:
            matches.append(("existing", hit[0]))
            continue
        hit = kept.find(normal, grams)
        if hit is not None:
            matches.append(("duplicate" if hit[1] else "near-duplicate", kept_at[hit[0]]))
            continue
        kept.add(normal, grams)
        kept_at.append(position)
        matches.append(None)
    return matches


def _rarest_first(item: tuple[str, int]) -> tuple[int, str]:
    gram, count = item
    return count, gram


def deduplicate(
    prompts: Sequence[str], *, threshold: float = 0.8, against: Sequence[str] = ()
) -> DedupResult:
    """Keep the first of each group of similar prompts, and nothing similar to ``against``.

    Greedy and order-preserving: a prompt is compared with ``against`` first, then with the
    prompts kept before it (not the removed ones); it goes if its normal form equals one of
    theirs or its `similarity` reaches ``threshold``. The prompt named as the one it duplicates
    is an exact (normal-form) match when there is one, else the oldest similar one. See
    `SHINGLE_SIZE` for what 0.8 catches.
    """
    matches = _match_all(prompts, threshold, against)
    kept: list[str] = []
    removed: list[tuple[str, str]] = []
    reasons: list[str] = []
    for prompt, match in zip(prompts, matches, strict=True):
        if match is None:
            kept.append(prompt)
            continue
        reason, index = match
        removed.append((prompt, against[index] if reason == "existing" else prompts[index]))
        reasons.append(reason)
    return DedupResult(tuple(kept), tuple(removed), tuple(reasons))


def distinct_records(
    records: Sequence[R],
    text: Callable[[R], str],
    *,
    threshold: float = 0.8,
    against: Sequence[str] = (),
) -> list[R]:
    """The records whose ``text`` `deduplicate` keeps, in input order, each text once (its
    first record: a record repeating a kept text is a duplicate too)."""
    kept = set(deduplicate([text(r) for r in records], threshold=threshold, against=against).kept)
    seen: set[str] = set()
    out = []
    for record in records:
        value = text(record)
        if value in kept and value not in seen:
            seen.add(value)
            out.append(record)
    return out


def near_duplicate_groups(
    prompts: Sequence[str], *, threshold: float = 0.8
) -> tuple[tuple[int, ...], ...]:
    """Indices of prompts that `deduplicate` would merge, one group per kept prompt.

    Each group starts with the kept prompt's index, followed by the indices it absorbed; only
    groups of two or more are returned. Meant for eyeballing what a threshold does.
    """
    groups: dict[int, list[int]] = {}
    for position, match in enumerate(_match_all(prompts, threshold, ())):
        if match is None:
            groups[position] = [position]
        else:
            groups[match[1]].append(position)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


# ============================================================================================
# 4. Reporting
# ============================================================================================


@dataclass(frozen=True)
class FilterReport:
    """How many prompts survived, and how many were dropped at which stage for which reason.

    Stage "parse" counts source lines (or JSON elements); "filter" and "dedup" count prompts.
    Reports add up with ``+``, so one report can cover every assertion of a constitution.
    """

    kept: int = 0
    counts: tuple[tuple[str, str, int], ...] = ()  # (stage, reason, count), sorted

    @classmethod
    def from_results(
        cls,
        *,
        parsed: ParseResult | Iterable[ParseResult] = (),
        filtered: FilterOutcome | None = None,
        deduped: DedupResult | None = None,
    ) -> FilterReport:
        """Summarise whichever stages were run; ``kept`` is the output of the last of them."""
        parsed = [parsed] if isinstance(parsed, ParseResult) else list(parsed)
        tally: Counter[tuple[str, str]] = Counter()
        for result in parsed:
            tally.update(("parse", reason) for _, reason in result.dropped)
        if filtered is not None:
            tally.update(("filter", reason) for _, reason in filtered.rejected)
        if deduped is not None:
            tally.update(("dedup", reason) for reason in deduped.reasons)
        if deduped is not None:
            kept = len(deduped.kept)
        elif filtered is not None:
            kept = len(filtered.kept)
        else:
            kept = sum(len(result.prompts) for result in parsed)
        return cls(kept, _sorted_counts(tally))

    def __add__(self, other: FilterReport) -> FilterReport:
        tally = Counter(self.as_dict()) + Counter(other.as_dict())
        return FilterReport(self.kept + other.kept, _sorted_counts(tally))

    @property
    def dropped(self) -> int:
        return sum(count for _, _, count in self.counts)

    def as_dict(self) -> dict[tuple[str, str], int]:
        """``{(stage, reason): count}``."""
        return {(stage, reason): count for stage, reason, count in self.counts}

    def as_rows(self) -> list[dict[str, object]]:
        """Rows for ``pandas.DataFrame``: one per (stage, reason), then a final "kept" row."""
        rows: list[dict[str, object]] = [
            {"stage": stage, "reason": reason, "count": count}
            for stage, reason, count in self.counts
        ]
        rows.append({"stage": "result", "reason": "kept", "count": self.kept})
        return rows


_STAGE_ORDER = {"parse": 0, "filter": 1, "dedup": 2}


def _sorted_counts(tally: Counter[tuple[str, str]]) -> tuple[tuple[str, str, int], ...]:
    items = [(stage, reason, n) for (stage, reason), n in tally.items() if n]
    return tuple(sorted(items, key=lambda row: (_STAGE_ORDER.get(row[0], 9), -row[2], row[1])))
