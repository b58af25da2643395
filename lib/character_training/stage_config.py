"""One way for a stage to get its settings from `RunParams`, and one fingerprint of them.

Every stage used to copy ten to fifteen fields out of `RunParams` by hand into its own frozen
``Config`` and hash them with its own ``fingerprint()``. Two copies of a field drift (a new
parameter added to the params section but not to the stage's copy is silently not part of
the fingerprint, so a changed setting reuses an old folder). Here a stage's ``Config`` only
*declares* what it reads:

* a field named after a `RunParams` section (``dpo: DPOParams``) takes the whole typed section,
  so every setting of that section is in the fingerprint without being listed;
* a field named after a run-level field (``student``, ``lora_rank``, ``seed``) takes its value;
* ``<role>_renderer`` (``student_renderer``, ``judge_renderer``, ...) is the chat format of the
  model in the ``<role>`` field: the preset's ``renderers:`` entry, else the default for the
  model name;
* anything else (digests of a previous stage's artefacts, a checkpoint path) is passed to
  `StageConfig.from_params` by name;
* a stage's own name for a setting of a section (``steps`` for ``evals.rl_steps``) is a
  `section_setting`, not a copied field.

`StageConfig.fingerprint` hashes the canonical JSON of all of it (plus optional extras the
stage only knows later, such as the digest of its input file), and `StageConfig.as_dict` is
what goes into the stage folder's ``config.json``.

A section shared by several stages (``evals`` holds the settings of stages 07, 08 and 09)
would make every stage's fingerprint change when any other stage's setting does, and a
resumed stage would refuse its folder (and ``overwrite`` would throw away expensive logs).
Such a stage names the field-name prefixes it reads in ``SECTION_PREFIXES`` (stage 08:
``{"evals": ("robustness_", "classifier_", "coherence_", "judge_")}``): only those fields are
recorded and fingerprinted. Fields follow a per-stage naming convention, so a new
``robustness_*`` setting is covered without editing the stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

RENDERER_SUFFIX = "_renderer"

S = TypeVar("S", bound="StageConfig")


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses and mappings as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_ready(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def digest(payload: Any, length: int = 12) -> str:
    """A short, stable hash of ``payload`` (canonical JSON: sorted keys, plain types)."""
    blob = json.dumps(json_ready(payload), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def renderer_of(params: Any, model: str) -> str:
    """The chat format of ``model`` in this run: the preset's entry, else the model's default."""
    from .renderers import renderer_for_model

    return params.renderers.get(model) or renderer_for_model(model)


def section_setting(section: str, name: str, doc: str = "") -> property:
    """A read-only ``Config`` attribute that reads ``<section>.<name>``: the stage's own name
    for a setting its params section spells for every stage (stage 09's ``steps`` is
    ``evals.rl_steps``). Declared in one line; the value stays in the section, so it is
    fingerprinted once, with the section."""
    return property(
        lambda config: getattr(getattr(config, section), name), doc=doc or f"{section}.{name}"
    )


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage's ``Config``; subclasses only declare fields (see module docstring)."""

    SECTION_PREFIXES: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    @classmethod
    def from_params(cls: type[S], params: Any, **derived: Any) -> S:
        """Fill every declared field from ``params`` (by name) or from ``derived``.

        A field that neither names a `RunParams` attribute nor is passed, and has no default,
        is a programming error in the stage and fails naming the field.
        """
        values: dict[str, Any] = {}
        unknown = set(derived) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"{cls.__module__}.Config has no field(s) {sorted(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name in derived:
                values[f.name] = derived[f.name]
            elif hasattr(params, f.name):
                values[f.name] = getattr(params, f.name)
            elif f.name.endswith(RENDERER_SUFFIX) and hasattr(
                params, role := f.name.removesuffix(RENDERER_SUFFIX)
            ):
                values[f.name] = renderer_of(params, getattr(params, role))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"{cls.__module__}.Config.{f.name}: not a RunParams field and not given; "
                    "pass it to from_params"
                )
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON types (what ``config.json`` holds); a section named in
        ``SECTION_PREFIXES`` keeps only the fields with those prefixes."""
        data = json_ready(self)
        for section, prefixes in self.SECTION_PREFIXES.items():
            data[section] = {
                k: v for k, v in data[section].items() if k.startswith(tuple(prefixes))
            }
        return data

    def fingerprint(self, **extra: Any) -> str:
        """Hash of every setting plus ``extra`` (inputs the stage knows only at run time)."""
        return digest({**self.as_dict(), **({"_extra": extra} if extra else {})})
