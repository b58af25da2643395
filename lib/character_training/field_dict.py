"""`FieldDict`: the one way a result dataclass becomes a JSON-ready dict.

Why a mixin: many frozen dataclasses (proportions, win rates, checkpoints, prompt records,
curve points, preference-model examples) are written to JSON exactly as their fields. Each
used to spell its own one-line ``asdict`` method, under four different names (``to_dict``,
``to_record``, ``record``, ``as_dict``); one name means a writer and a reader never disagree on
which method a record has, and a new record type gets it by inheritance.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class FieldDict:
    """Mixin for a dataclass whose JSON record is exactly its fields."""

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, in declaration order (nested dataclasses become dicts too)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]
