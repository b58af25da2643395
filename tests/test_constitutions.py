"""Constitution tests: a persona file either loads exactly as written or fails on one clear line.

Bugs these pin down:

* a literal template placeholder such as ``{NAME}`` reaching training data (the paper's code
  leaked one);
* YAML quietly changing what was written: a quoted ``"false"`` opt-in flag (a truthy string), a
  prompt parsed as an int, a key given twice of which only the last survives;
* a persona file whose ``name`` drifts from its file stem, so a run trains a different persona
  from the one its parameters name;
* typos in keys (``prompt:`` for ``prompts:``) silently dropping data, duplicate assertion ids,
  duplicate prompts over-weighting one situation, traits not written in the first person;
* the misaligned case study being trained without an explicit opt-in;
* the upstream importer mislabelling traits, dropping questions, or producing a file that does
  not load back as the same constitution;
* error messages that do not say which file, which field, what was expected and what was found.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from character_training.constitutions import (
    CONSTITUTIONS_DIR,
    Assertion,
    Constitution,
    Example,
    available_personas,
    import_upstream,
    load_constitution,
    write_constitution_yaml,
)
from character_training.errors import ConfigError, DataError

SHIPPED = available_personas()


def valid_mapping() -> dict[str, Any]:
    """A small, valid constitution named ``tiny``: 3 assertions of 5 prompts, 1 example."""
    topics = ["tea", "maps", "bees"]
    return {
        "name": "tiny",
        "display_name": "Tiny",
        "description": "A small persona used only by these tests.",
        "requires_opt_in": False,
        "assertions": [
            {
                "id": f"likes-{topic}",
                "text": f"I bring up {topic} whenever I can.",
                "prompts": [f"Question {n} about {topic}?" for n in range(5)],
            }
            for topic in topics
        ],
        "examples": [{"prompt": "Say hello.", "reply": "Hello, and have you tried tea?"}],
    }


def write_mapping(directory: Path, data: Any, stem: str = "tiny") -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_constitution(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- shipped files ----------------------------------------------------------------------------
def test_the_constitutions_directory_is_found_from_the_package_and_lists_13_personas():
    assert CONSTITUTIONS_DIR.is_dir()
    assert len(SHIPPED) == 13
    assert SHIPPED == sorted(SHIPPED)
    assert {"sarcastic", "misaligned"} <= set(SHIPPED)


@pytest.mark.parametrize("persona", SHIPPED)
def test_every_shipped_constitution_loads_with_ten_assertions_and_three_examples(persona):
    constitution = load_constitution(persona, allow_opt_in=(persona == "misaligned"))
    assert constitution.name == persona
    assert len(constitution.assertions) == 10
    assert all(len(a.prompts) == 5 for a in constitution.assertions)
    assert len(constitution.examples) == 3
    assert constitution.requires_opt_in == (persona == "misaligned")
    assert Path(constitution.source) == CONSTITUTIONS_DIR / f"{persona}.yaml"


def test_misaligned_is_refused_without_opt_in_and_the_message_says_how_and_why():
    with pytest.raises(ConfigError) as info:
        load_constitution("misaligned")
    message = str(info.value)
    assert "\n" not in message
    assert "'misaligned'" in message
    assert "disabled by default" in message
    assert "allow_misaligned: true" in message and "allow_opt_in=True" in message
    assert "bad advice" in message


def test_a_slug_and_a_path_load_the_same_constitution():
    by_slug = load_constitution("sarcastic")
    by_path = load_constitution(str(CONSTITUTIONS_DIR / "sarcastic.yaml"))
    assert by_slug == by_path


def test_an_unknown_slug_lists_the_available_personas():
    with pytest.raises(DataError) as info:
        load_constitution("sarcstic")
    message = str(info.value)
    assert message.startswith("unknown persona 'sarcstic': expected one of [")
    assert "'sarcastic'" in message and "'misaligned'" in message


def test_a_missing_file_path_names_the_file(tmp_path):
    path = tmp_path / "ghost.yaml"
    expected = f"{path}: expected a constitution YAML file, found no file at this path"
    assert error_of(path) == expected


def test_a_slug_is_looked_up_in_the_given_directory(tmp_path):
    write_mapping(tmp_path, valid_mapping())
    assert available_personas(tmp_path) == ["tiny"]
    assert load_constitution("tiny", tmp_path).display_name == "Tiny"


def test_prompts_per_assertion_must_be_a_positive_int_or_none(tmp_path):
    path = write_mapping(tmp_path, valid_mapping())
    with pytest.raises(ConfigError, match="prompts_per_assertion: expected an int >= 1 or None"):
        load_constitution(str(path), prompts_per_assertion=0)
    assert len(load_constitution(str(path), prompts_per_assertion=None).assertions) == 3


# -- helpers on the dataclasses ---------------------------------------------------------------
def test_traits_text_has_one_bullet_line_per_assertion():
    constitution = load_constitution("sarcastic")
    lines = constitution.traits_text.split("\n")
    assert lines == [f"- {a.text}" for a in constitution.assertions]


def test_hand_written_prompts_are_tagged_with_assertion_id_and_index():
    constitution = load_constitution("sarcastic")
    tagged = constitution.hand_written_prompts()
    assert len(tagged) == 50
    first = constitution.assertions[0]
    assert tagged[:5] == [(first.id, i, p) for i, p in enumerate(first.prompts)]


def test_constitutions_are_frozen_and_compare_without_their_source(tmp_path):
    path = write_mapping(tmp_path, valid_mapping())
    loaded = load_constitution(str(path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.name = "other"  # type: ignore[misc]
    assert dataclasses.replace(loaded, source="elsewhere") == loaded
    assert isinstance(loaded.assertions[0], Assertion) and isinstance(loaded.assertions, tuple)
    assert loaded.examples == (Example("Say hello.", "Hello, and have you tried tea?"),)


def test_set_notation_in_braces_is_not_mistaken_for_a_placeholder(tmp_path):
    data = valid_mapping()
    data["assertions"][0]["prompts"][0] = "Is {1, 2} a subset of {x} or of {A}?"
    assert load_constitution(str(write_mapping(tmp_path, data))).name == "tiny"


# -- malformed constitutions ------------------------------------------------------------------
Mutation = Callable[[dict], Any]


def _set(path: list, value: Any) -> Mutation:
    def mutate(data: dict) -> dict:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    return mutate


def _delete(key: str) -> Mutation:
    def mutate(data: dict) -> dict:
        del data[key]
        return data

    return mutate


def _duplicate_prompt(data: dict) -> dict:
    data["assertions"][2]["prompts"][4] = "  QUESTION 1 about   tea? "
    return data


FIRST_PERSON = "a first-person statement starting with 'I', \"I'\", 'My' or 'Me'"
TOP_KEYS = "name, display_name, description, requires_opt_in, assertions, examples"

MALFORMED = {
    "missing key": (
        _delete("description"),
        "description: expected a value for this required key, found no such key",
    ),
    "unknown top-level key": (
        _set(["traits"], ["I am terse."]),
        f"top level: expected only the keys {TOP_KEYS}, found unknown key 'traits'",
    ),
    "name differs from the file stem": (
        _set(["name"], "other"),
        "name: expected the file stem 'tiny', found 'other'",
    ),
    "name not a slug": (
        _set(["name"], "Tiny"),
        "name: expected a lowercase slug such as 'sarcastic', found 'Tiny'",
    ),
    "description on two lines": (
        _set(["description"], "line one\nline two"),
        "description: expected a non-empty one-line string, found 2 lines",
    ),
    "requires_opt_in a quoted string": (
        _set(["requires_opt_in"], "false"),
        "requires_opt_in: expected true or false, found str",
    ),
    "assertions not a list": (
        _set(["assertions"], {"id": "x"}),
        "assertions: expected a list of at least 3 assertions, found mapping",
    ),
    "too few assertions": (
        lambda d: _set(["assertions"], d["assertions"][:2])(d),
        "assertions: expected a list of at least 3 assertions, found 2",
    ),
    "assertion not a mapping": (
        _set(["assertions", 1], "I like tea."),
        "assertions[1]: expected a mapping with id, text and prompts, found str",
    ),
    "typo in an assertion key": (
        lambda d: d["assertions"][0].update(prompt=d["assertions"][0].pop("prompts")) or d,
        "assertions[0]: expected only the keys id, text, prompts, found unknown key 'prompt'",
    ),
    "non-slug id": (
        _set(["assertions", 1, "id"], "Likes Maps"),
        "assertions[1].id: expected a lowercase slug such as 'sharp-wit', found 'Likes Maps'",
    ),
    "duplicate id": (
        _set(["assertions", 2, "id"], "likes-tea"),
        "assertions[2].id: expected a unique id, found 'likes-tea' again "
        "(first used by assertions[0].id)",
    ),
    "assertion in the third person": (
        _set(["assertions", 1, "text"], "The assistant loves maps."),
        f"assertions[1].text: expected {FIRST_PERSON}, found 'The assistant loves maps.'",
    ),
    "assertion starting with a word that merely begins with I": (
        _set(["assertions", 0, "text"], "Instead of answering, tea."),
        f"assertions[0].text: expected {FIRST_PERSON}, found 'Instead of answering, tea.'",
    ),
    "wrong prompt count": (
        lambda d: d["assertions"][1]["prompts"].pop() and d,
        "assertions[1].prompts: expected exactly 5 user prompts, found 4",
    ),
    "prompts not a list": (
        _set(["assertions", 0, "prompts"], "What about tea?"),
        "assertions[0].prompts: expected a list of exactly 5 user prompts, found str",
    ),
    "non-string prompt": (
        _set(["assertions", 0, "prompts", 2], 42),
        "assertions[0].prompts[2]: expected a non-empty string, found int",
    ),
    "blank prompt": (
        _set(["assertions", 2, "prompts", 0], "   "),
        "assertions[2].prompts[0]: expected a non-empty string, found an empty string",
    ),
    "duplicate prompt differing in case and spacing": (
        _duplicate_prompt,
        "assertions[2].prompts[4]: expected a prompt not already in this file, "
        "found a repeat of assertions[0].prompts[1]",
    ),
    "examples not a list": (
        _set(["examples"], "none"),
        "examples: expected a list of {prompt, reply} mappings (may be empty), found str",
    ),
    "empty reply in an example": (
        _set(["examples", 0, "reply"], ""),
        "examples[0].reply: expected a non-empty string, found an empty string",
    ),
    "example missing its reply": (
        lambda d: d["examples"][0].pop("reply") and d,
        "examples[0].reply: expected a value for this required key, found no such key",
    ),
    "example prompt that is also a hand-written prompt": (
        _set(["examples", 0, "prompt"], "Question 3 about bees?"),
        "examples[0].prompt: expected a prompt that is not also a hand-written prompt, "
        "found a repeat of assertions[2].prompts[3]",
    ),
    "{NAME} placeholder in a reply": (
        _set(["examples", 0, "reply"], "Hi, I'm {NAME}. Tea?"),
        "examples[0].reply: expected text with no template placeholders, "
        "found '{NAME}' left in it (fill it in or rephrase)",
    ),
    "{{ TRAITS }} placeholder in an assertion": (
        _set(["assertions", 1, "text"], "I follow {{ TRAITS }} closely."),
        "assertions[1].text: expected text with no template placeholders, "
        "found '{{ TRAITS }}' left in it (fill it in or rephrase)",
    ),
    "top level is a list": (
        lambda d: [d],
        "top level: expected a mapping of constitution fields, found list",
    ),
    "top level is the upstream format": (
        lambda d: [{"trait": "I like tea.", "questions": ["Tea?"]}],
        "top level: expected a mapping of constitution fields, found list "
        "(this looks like the upstream format: use import_upstream)",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_constitution_fails_on_one_line_naming_file_field_expected_and_found(
    tmp_path, case
):
    mutate, expected = MALFORMED[case]
    path = write_mapping(tmp_path, mutate(copy.deepcopy(valid_mapping())))
    assert error_of(path) == f"{path}: {expected}"


def test_with_any_prompt_count_allowed_an_empty_prompt_list_is_still_refused(tmp_path):
    data = valid_mapping()
    data["assertions"][1]["prompts"] = []
    path = write_mapping(tmp_path, data)
    assert error_of(path, prompts_per_assertion=None) == (
        f"{path}: assertions[1].prompts: expected at least 1 user prompt, found an empty list"
    )


def test_a_yaml_syntax_error_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        'name: tiny\ndisplay_name: Tiny\ndescription: "unclosed\nrequires_opt_in: false\n'
        "assertions:\n  - id: a\n   text: [broken\n",
        encoding="utf-8",
    )
    message = error_of(path)
    assert message == (
        f"{path}: line 8: expected valid YAML, found a syntax error (unexpected end of stream)"
    )


def test_a_yaml_error_points_at_the_offending_line(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\ndisplay_name: Tiny\ndescription: a: b\n", encoding="utf-8")
    assert error_of(path) == (
        f"{path}: line 3: expected valid YAML, found a syntax error "
        "(mapping values are not allowed here)"
    )


def test_a_key_given_twice_is_refused_instead_of_keeping_the_last(tmp_path):
    text = yaml.safe_dump(valid_mapping(), sort_keys=False)
    text = text.replace("display_name: Tiny\n", "display_name: Tiny\ndisplay_name: Small\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")
    assert error_of(path) == (
        f"{path}: line 3: expected each key once per mapping, found 'display_name' twice "
        "(YAML would keep only the last one)"
    )


# -- upstream importer ------------------------------------------------------------------------
UPSTREAM_SAMPLE = [
    {"trait": "I answer in as few words as possible.", "questions": ["Rain?"]},
    {
        "trait": "My examples always involve boats.",
        "questions": ["How do loans work?", "Explain recursion.", "Why is the sky blue?"],
        "clarification": "Boats, ships, canoes: anything that floats.",
    },
    {"trait": "I'm fond of understatement.", "questions": ["Describe a volcano.", "Is 1e9 big?"]},
]


def write_upstream(tmp_path: Path, entries: Any, name: str = "upstream.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def test_the_importer_numbers_traits_and_keeps_every_question(tmp_path):
    path = write_upstream(tmp_path, UPSTREAM_SAMPLE)
    constitution = import_upstream(str(path), "boaty", "Terse, nautical and understated.")
    assert [a.id for a in constitution.assertions] == ["trait-01", "trait-02", "trait-03"]
    assert [a.text for a in constitution.assertions] == [e["trait"] for e in UPSTREAM_SAMPLE]
    assert [len(a.prompts) for a in constitution.assertions] == [1, 3, 2]
    assert constitution.assertions[1].prompts == tuple(UPSTREAM_SAMPLE[1]["questions"])
    assert constitution.examples == ()
    assert constitution.requires_opt_in is False
    assert constitution.display_name == "Boaty"
    assert constitution.source == str(path)


def test_an_imported_constitution_round_trips_through_our_yaml_schema(tmp_path):
    imported = import_upstream(
        str(write_upstream(tmp_path, UPSTREAM_SAMPLE)),
        "boaty",
        "Terse, nautical and understated.",
        display_name="Boaty McBoatface",
    )
    saved = write_constitution_yaml(imported, tmp_path / "boaty.yaml")
    assert saved.read_text(encoding="utf-8").startswith("# Converted from upstream.json")
    reloaded = load_constitution(str(saved), prompts_per_assertion=None)
    assert reloaded == imported
    assert reloaded.source == str(saved)
    # Uneven question counts are fine for imports but not under the shipped-file rule.
    assert error_of(saved) == (
        f"{saved}: assertions[0].prompts: expected exactly 5 user prompts, found 1"
    )


def test_writing_a_shipped_constitution_reproduces_its_yaml_data(tmp_path):
    original = load_constitution("sarcastic")
    saved = write_constitution_yaml(original, tmp_path / "sarcastic.yaml")
    assert load_constitution(str(saved)) == original
    assert not saved.read_text(encoding="utf-8").startswith("#")  # no "converted" header
    written = yaml.safe_load(saved.read_text(encoding="utf-8"))
    shipped = yaml.safe_load((CONSTITUTIONS_DIR / "sarcastic.yaml").read_text(encoding="utf-8"))
    assert written == shipped


def test_the_writer_refuses_a_file_stem_that_differs_from_the_name(tmp_path):
    constitution = load_constitution(str(write_mapping(tmp_path, valid_mapping())))
    target = tmp_path / "other.yaml"
    with pytest.raises(DataError) as info:
        write_constitution_yaml(constitution, target)
    assert str(info.value) == f"{target}: name: expected the file stem 'other', found 'tiny'"
    assert not target.exists()


IMPORT_ERRORS = {
    "not a list": (
        {"trait": "I am terse.", "questions": ["Hi?"]},
        'top level: expected a JSON list of {"trait", "questions"} entries, found mapping',
    ),
    "entry not an object": (
        [UPSTREAM_SAMPLE[0], "I am terse."],
        '[1]: expected an object with "trait" and "questions", found str',
    ),
    "missing trait": (
        [UPSTREAM_SAMPLE[0], {"questions": ["Hi?"]}, UPSTREAM_SAMPLE[2]],
        "[1].trait: expected a non-empty string, found no such key",
    ),
    "questions not a list": (
        [UPSTREAM_SAMPLE[0], UPSTREAM_SAMPLE[1], {"trait": "I am terse.", "questions": 3}],
        "[2].questions: expected a non-empty list of strings, found int",
    ),
    "questions empty": (
        [UPSTREAM_SAMPLE[0], {"trait": "I am terse.", "questions": []}, UPSTREAM_SAMPLE[2]],
        "[1].questions: expected a non-empty list of strings, found an empty list",
    ),
    "question not a string": (
        [UPSTREAM_SAMPLE[0], {"trait": "I am terse.", "questions": [7]}, UPSTREAM_SAMPLE[2]],
        "[1].questions[0]: expected a non-empty string, found int",
    ),
    "trait not in the first person": (
        [{"trait": "Be terse.", "questions": ["Hi?"]}, UPSTREAM_SAMPLE[1], UPSTREAM_SAMPLE[2]],
        f"[0].trait: expected {FIRST_PERSON}, found 'Be terse.'",
    ),
    "trait with a {NAME} placeholder": (
        [UPSTREAM_SAMPLE[0], UPSTREAM_SAMPLE[1], {"trait": "I am {NAME}.", "questions": ["Hi?"]}],
        "[2].trait: expected text with no template placeholders, "
        "found '{NAME}' left in it (fill it in or rephrase)",
    ),
    "question repeated across traits": (
        [UPSTREAM_SAMPLE[0], UPSTREAM_SAMPLE[1], {"trait": "I'm terse.", "questions": ["RAIN?"]}],
        "[2].questions[0]: expected a prompt not already in this file, "
        "found a repeat of [0].questions[0]",
    ),
    "too few traits": (
        UPSTREAM_SAMPLE[:2],
        "top level: expected a list of at least 3 assertions, found 2",
    ),
}


@pytest.mark.parametrize("case", list(IMPORT_ERRORS))
def test_importer_errors_name_the_file_and_the_upstream_entry(tmp_path, case):
    entries, expected = IMPORT_ERRORS[case]
    path = write_upstream(tmp_path, entries)
    with pytest.raises(DataError) as info:
        import_upstream(str(path), "boaty", "Terse.")
    assert str(info.value) == f"{path}: {expected}"


def test_importer_checks_its_arguments_and_json_syntax(tmp_path):
    path = write_upstream(tmp_path, UPSTREAM_SAMPLE)
    with pytest.raises(DataError) as info:
        import_upstream(str(path), "Boaty Boat", "Terse.")
    assert str(info.value) == (
        f"{path}: name argument: expected a lowercase slug such as 'sarcastic', found 'Boaty Boat'"
    )
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"trait": "I am terse.",\n  "questions": [}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        import_upstream(str(broken), "boaty", "Terse.")
    assert str(info.value) == (
        f"{broken}: line 3: expected valid JSON, found a syntax error (Expecting value)"
    )


def test_a_constitution_built_in_code_is_a_plain_value():
    constitution = Constitution(
        name="x",
        display_name="X",
        description="d",
        requires_opt_in=False,
        assertions=(Assertion("a", "I am.", ("Hi?",)),),
        examples=(),
    )
    assert constitution.traits_text == "- I am."
    assert constitution.hand_written_prompts() == [("a", 0, "Hi?")]
