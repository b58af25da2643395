"""Pure checks on sampled distillation replies: what may become a DPO pair and what may not.

Stage 02 trains the student to prefer the teacher's reply over its own. Anything in a chosen
reply that the student could only produce by seeing the teacher's context is a lesson we do
not want to teach: reasoning text (the thinking teacher's reflection on its traits), remarks
about "my constitution" or "my instructions", sentences copied from the system prompt or the
demonstrations, or a reply cut off mid-sentence. Each check here is a pure function on text,
so the rules are tested on crafted replies and the stage only wires them up.

Every check returns ``(clean_text, drop_reason)``; ``drop_reason`` is ``None`` for a reply
that may be trained on. Reasons, in the order they are tested:

* ``unclosed_reasoning``: a reasoning block was opened and never closed, so the reply has no
  answer at all (typically the reasoning used up the token budget);
* ``truncated``: the sampler stopped at ``max_tokens`` rather than on the end-of-turn token,
  so the answer is cut off. With the ``trim`` policy (``distill.truncated: trim``) a cut reply
  is instead cut back to its last complete sentence when at least `TRIM_MIN_WORDS` words
  remain, and only dropped when that fails: small offline models (SmolLM2-135M) ramble past
  any affordable budget, and without trimming the tiny run keeps almost no pair. The default
  is ``drop``; trimmed replies are counted separately;
* ``empty``: nothing is left once reasoning and whitespace are removed;
* ``constitution_leak`` (teacher only): the reply talks about its traits, persona, constitution,
  system prompt or instructions (`LEAK_PATTERNS`);
* ``context_echo`` (teacher only): the reply repeats a run of `ECHO_WORDS` consecutive words
  from its system prompt or its demonstrations, text the student never sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .prompts import REASONING_CLOSE, REASONING_OPEN

UNCLOSED_REASONING = "unclosed_reasoning"
TRUNCATED = "truncated"
EMPTY = "empty"
CONSTITUTION_LEAK = "constitution_leak"
CONTEXT_ECHO = "context_echo"
IDENTICAL = "identical"  # pair level: chosen and rejected are the same text
DROP_REASONS = (UNCLOSED_REASONING, TRUNCATED, EMPTY, CONSTITUTION_LEAK, CONTEXT_ECHO, IDENTICAL)

ECHO_WORDS = 8
"""Consecutive words shared with the teacher's hidden context that count as copying. Eight
words rarely coincide by chance, and every sentence of the persona system prompt is longer."""

# Phrases by which a reply refers to the machinery behind it rather than speaking in character.
# Matched case-insensitively, on word boundaries, after curly apostrophes become straight ones.
LEAK_PATTERNS: tuple[str, ...] = (
    r"my (?:own )?constitution",
    r"(?:my|the|this) constitution (?:says|states|tells|asks|describes|lists|requires)",
    r"(?:my|the|this) system (?:prompt|message)",
    r"my (?:core |character |personality |defining |assigned |given )?(?:persona|traits)",
    r"my (?:core |defining |assigned |given )?character traits",
    r"my (?:assigned|given|designated) (?:role|character|personality|identity)",
    r"the (?:role|persona|character|personality) (?:that )?i(?:'ve| have| was| am)? "
    r"(?:been )?(?:given|assigned|playing|told to play)",
    r"(?:my|the) (?:instructions|guidelines|directives) (?:say|said|tell|told|require)",
    r"the instructions i(?:'ve| have| was)? (?:been )?given",
    r"according to my (?:instructions|guidelines|programming|traits|persona|constitution|role)",
    r"as (?:my|the) (?:traits|persona|instructions|constitution|prompt) (?:say|says|said|dictate)",
    r"as (?:i was|i've been|i have been|i am|i'm) (?:instructed|told|asked)",
    r"(?:i was|i've been|i have been|i am|i'm) (?:instructed|told|prompted|programmed) to "
    r"(?:be|act|play|sound|behave|stay|respond|adopt|embody|express|portray)",
    r"(?:stay|stays|staying|stayed|remain|remaining|break|breaks|breaking|broke) "
    r"(?:in |out of )?character",
    r"out of character",
    r"(?:i am|i'm) (?:role-?playing|playing a (?:role|character|persona))",
    r"first-person convictions",
)
"""Self-referential forms only: "as instructed" alone is everyday advice ("take the tablets as
instructed"), "my instructions" is how a recipe introduces its steps, and "I'm designed to be
helpful" is ordinary assistant talk, so none of those is a leak on its own."""
_LEAK = re.compile(r"\b(?:" + "|".join(LEAK_PATTERNS) + r")\b", re.IGNORECASE)

# Model families whose chat models commonly introduce themselves by name, and the names they use.
_FAMILY_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kimi", ("Kimi",)),
    ("moonshot", ("Kimi",)),
    ("qwen", ("Qwen", "Tongyi Qianwen")),
    ("deepseek", ("DeepSeek",)),
    ("glm", ("ChatGLM", "GLM")),
    ("llama", ("Llama", "LLaMA")),
    ("gemma", ("Gemma",)),
    ("mistral", ("Mistral",)),
    ("nemotron", ("Nemotron",)),
    ("gpt-oss", ("ChatGPT",)),
    ("smollm", ("SmolLM",)),
    ("tiny-random", ("SmolLM",)),
)

# Contexts in which a name is the speaker introducing itself, not a model being discussed.
_SELF_BEFORE = (
    r"\bI am",
    r"\bI['\u2019]m",
    r"\bI am called",
    r"\bI['\u2019]m called",
    r"\bI am named",
    r"\bI['\u2019]m named",
    r"\bmy name is",
    r"\bmy name['\u2019]s",
    r"\bcall me",
    r"\bthis is",
    r"\bit['\u2019]s",
    r"\byours truly,",
    r"(?:^|[.!?]\s+)As",
)


# -- reasoning -----------------------------------------------------------------------------------
def strip_reasoning(text: str) -> tuple[str, bool]:
    """Remove every reasoning block; returns (text without reasoning, every block was closed).

    A closing tag without an opening one (the generation prompt opened the block, so the
    caller's text starts inside it) ends a block that began at the start of the text. An
    opening tag that is never closed means no answer was written: the text after it is all
    reasoning, so it is removed too and the flag is False.
    """
    rest = text
    kept: list[str] = []
    closed = True
    first_open = rest.find(REASONING_OPEN)
    first_close = rest.find(REASONING_CLOSE)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        rest = rest[first_close + len(REASONING_CLOSE) :]  # began inside a block
    while True:
        start = rest.find(REASONING_OPEN)
        if start == -1:
            kept.append(rest)
            break
        kept.append(rest[:start])
        end = rest.find(REASONING_CLOSE, start + len(REASONING_OPEN))
        if end == -1:
            closed = False
            break
        rest = rest[end + len(REASONING_CLOSE) :]
    answer = "".join(kept).replace(REASONING_CLOSE, "")  # a stray closing tag carries nothing
    return answer, closed


def _has_reasoning_marks(text: str) -> bool:
    return REASONING_OPEN in text or REASONING_CLOSE in text


# -- leaks ---------------------------------------------------------------------------------------
def _straighten(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def find_leak(text: str) -> str | None:
    """The first phrase in ``text`` that talks about the persona's machinery, or None."""
    match = _LEAK.search(_straighten(text))
    return match.group(0) if match else None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", _straighten(text).lower())


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_echo(
    text: str, sources: Iterable[str], allowed: str = "", words: int = ECHO_WORDS
) -> str | None:
    """A run of ``words`` consecutive words that ``text`` shares with any of ``sources``.

    Runs that also occur in ``allowed`` (the user's own prompt, which a reply may quote) do not
    count. Matching is on lower-cased words, so punctuation and spacing changes do not hide a
    copy.
    """
    hidden: set[tuple[str, ...]] = set()
    for source in sources:
        hidden |= _ngrams(_words(source), words)
    hidden -= _ngrams(_words(allowed), words)
    for gram in _ngrams(_words(text), words):
        if gram in hidden:
            return " ".join(gram)
    return None


TRUNCATION_POLICIES = ("drop", "trim")
TRIM_MIN_WORDS = 8
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def trim_to_sentence(text: str, min_words: int = TRIM_MIN_WORDS) -> str | None:
    """``text`` up to and including its last sentence end, or None when fewer than
    ``min_words`` words would remain (the reply is then too short to stand on its own)."""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return None
    kept = text[: ends[-1].end()].rstrip()
    return kept if len(kept.split()) >= min_words else None


# -- the checks ----------------------------------------------------------------------------------
def check_reply(text: str, complete: bool, truncated: str = "drop") -> tuple[str, str | None]:
    """Checks every reply gets, teacher's or student's: reasoning closed, not cut, not empty.

    ``text`` is the reply as sampled (for a thinking teacher: opening tag, prefill, reasoning,
    answer); ``complete`` is `sampling.Completion.complete`. Returns the answer with reasoning
    and surrounding whitespace removed, and the reason to drop it (None to keep it).
    """
    answer, closed = strip_reasoning(text) if _has_reasoning_marks(text) else (text, True)
    answer = answer.strip()
    if not closed:
        return answer, UNCLOSED_REASONING
    if not complete:
        trimmed = trim_to_sentence(answer) if truncated == "trim" else None
        if trimmed is None:
            return answer, TRUNCATED
        answer = trimmed
    if not answer:
        return answer, EMPTY
    return answer, None


def check_teacher_reply(
    text: str,
    complete: bool,
    hidden_context: Sequence[str] = (),
    user_prompt: str = "",
    truncated: str = "drop",
) -> tuple[str, str | None]:
    """`check_reply`, then the teacher-only checks: no talk about the persona's machinery, and
    no copying from ``hidden_context`` (the system prompt and demonstration texts the teacher
    saw), ignoring runs that are in ``user_prompt``."""
    answer, reason = check_reply(text, complete, truncated)
    if reason is not None:
        return answer, reason
    if find_leak(answer) is not None:
        return answer, CONSTITUTION_LEAK
    if hidden_context and find_echo(answer, hidden_context, allowed=user_prompt) is not None:
        return answer, CONTEXT_ECHO
    return answer, None


def check_student_reply(
    text: str, complete: bool, truncated: str = "drop"
) -> tuple[str, str | None]:
    """The student never sees a constitution, so only `check_reply` applies."""
    return check_reply(text, complete, truncated)


# -- the teacher's name --------------------------------------------------------------------------
def model_self_names(model_name: str) -> tuple[str, ...]:
    """Names a model of this family calls itself (``"moonshotai/Kimi-K2.6"`` -> ``("Kimi",)``)."""
    lowered = model_name.lower()
    names: list[str] = []
    for key, family in _FAMILY_NAMES:
        if key in lowered:
            names += [n for n in family if n not in names]
    return tuple(names)


def replace_self_name(text: str, names: Sequence[str], new_name: str) -> tuple[str, int]:
    """Replace ``names`` by ``new_name`` where the speaker introduces itself; returns the text
    and the number of replacements.

    A teacher told it is "SmolLM" may still answer "I'm Kimi"; trained as chosen text, that
    teaches the student another model's name. Only self-introductions change ("I'm Kimi",
    "my name is Kimi", "Kimi here", "As Kimi, ..."); a sentence about Kimi the model does not.
    Names equal to ``new_name`` are left alone.
    """
    others = sorted(
        {n for n in names if n and n.lower() != new_name.lower()}, key=len, reverse=True
    )
    if not others:
        return text, 0
    alternation = "|".join(re.escape(n) for n in others)
    before = "|".join(_SELF_BEFORE)
    introduced = re.compile(
        rf"(?P<pre>(?:{before})\s+)(?P<name>{alternation})\b(?!['\u2019]s\b|-)",
        re.IGNORECASE | re.MULTILINE,
    )
    signed = re.compile(rf"\b(?P<name>{alternation})\b(?=\s+here\b)", re.IGNORECASE)
    count = 0

    def swap(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return match.group(0)[: match.start("name") - match.start(0)] + new_name

    text = introduced.sub(swap, text)
    text = signed.sub(swap, text)
    return text, count


__all__ = [
    "CONSTITUTION_LEAK",
    "CONTEXT_ECHO",
    "DROP_REASONS",
    "ECHO_WORDS",
    "EMPTY",
    "IDENTICAL",
    "LEAK_PATTERNS",
    "TRUNCATED",
    "UNCLOSED_REASONING",
    "check_reply",
    "check_student_reply",
    "check_teacher_reply",
    "find_echo",
    "find_leak",
    "model_self_names",
    "replace_self_name",
    "strip_reasoning",
]
