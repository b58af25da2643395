"""The names of the teacher-likeness probe sets, and which one a headline reports.

Why a module of its own: the adherence measure (`evaluate.adherence`) picks the headline set
when it writes a report, and the run summary (`summary`) must pick the same one when it reads
the report's JSON back, without importing the measure (and its model stack). One rule, here.
"""

from __future__ import annotations

from collections.abc import Iterable

CLASSIFIER_SOURCE = "constitution"  # the only held-out source split into classifier prompts
UNSEEN_SOURCE = "unseen"  # prompts of assertions held out whole by stage 02 (the headline set)


def headline_probe_set(probe_sets: Iterable[str]) -> str:
    """The probe set headlines report, given the probe sets a report's rows cover: prompts of
    assertions never trained on ("unseen") when stage 02 held some out, else the held-out
    siblings of trained prompts."""
    return UNSEEN_SOURCE if UNSEEN_SOURCE in set(probe_sets) else CLASSIFIER_SOURCE
