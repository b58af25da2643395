"""`persona new|import|check|preview|list`: authoring a persona from the command line.

Bugs these pin down:

* a new persona that `run` still calls "unknown persona" because its params file was never
  written (the constitution alone is not enough);
* a half-filled skeleton reaching a run, or `check` naming only the first slot left;
* `check` passing a file that stage 01 then refuses (check must load it the way the pipeline
  does), or failing without the loader's one line;
* near-duplicate hand-written prompts and missing demonstrations for a few-shot teacher going
  unnoticed until the data is generated;
* an existing constitution or params file silently overwritten;
* a paid preview starting without a confirmation, or hanging on a question when no one can
  answer it (stdin not a terminal);
* the preview showing a teacher prompt other than the one distillation builds.

Every test writes into a temporary copy of ``constitutions/`` and ``params/``; an autouse
fixture checks that the repository's own folders are left exactly as they were.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from character_training import authoring, persona_preview
from character_training.cli import main
from character_training.config import (
    PARAMS_DIR,
    SMOKE_OVERRIDES,
    available_sizes,
    load_params,
    with_overrides,
)
from character_training.constitutions import (
    CONSTITUTIONS_DIR,
    import_upstream,
    load_constitution,
)
from character_training.errors import DataError
from character_training.prompts import teacher_messages

NAME = "stoic"

DESCRIPTION = "A calm assistant who meets every setback with quiet, practical acceptance."
TRAITS = [
    "I stay calm when people bring me bad news, and I help them separate what they can "
    "change from what they cannot.",
    "I speak plainly and briefly, preferring one steady sentence to a paragraph of reassurance "
    "or drama.",
    "My advice always returns to the next small action a person can take today, however large "
    "the trouble feels.",
    "I treat setbacks as ordinary parts of life rather than disasters, and I say so without "
    "sounding cold or dismissive.",
    "I'm wary of strong emotions driving decisions, so I gently suggest waiting a day before "
    "acting on anger or panic.",
]
PROMPTS = [
    "My flight got cancelled and I'm going to miss my sister's wedding rehearsal.",
    "How do I stop checking my phone every five minutes?",
    "The landlord just raised the rent by 30%. I'm furious.",
    "Can you explain how compound interest works?",
    "I failed my driving test for the third time.",
    "Write me a short toast for my parents' anniversary dinner.",
    "My code review got torn apart by a senior engineer today.",
    "What's a good way to learn Spanish vocabulary?",
    "Our basement flooded overnight and the insurance won't cover it.",
    "Is it normal to feel nervous before a job interview?",
    "I want to quit my job tomorrow and tell my boss exactly what I think.",
    "Recommend a book about ancient Rome.",
    "My best friend forgot my birthday.",
    "The stock market dropped and my savings lost 12% this month.",
    "How long should I boil an egg for a runny yolk?",
    "I spilled coffee on my laptop right before a deadline.",
    "Should I text my ex back after two years of silence?",
    "Give me a packing list for a weekend camping trip.",
    "My team lost the championship final on a penalty.",
    "What causes the northern lights?",
    "I just got a parking ticket for a sign I couldn't even see.",
    "Help me plan a cheap vegetarian meal for six people.",
    "My manager took credit for my project in front of everyone.",
    "Why do cats knock things off tables?",
    "I can't sleep because I keep replaying an embarrassing thing I said.",
]
EXAMPLES = [
    ("I lost my wallet on the bus this morning.", "That is annoying. Cancel the cards first."),
    ("Everything is going wrong this week.", "Some weeks are heavy. Which part can you fix?"),
    ("My sourdough starter died.", "Starters die. Flour and water are cheap; begin again."),
]


# -- fixtures and helpers ---------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def repository_folders_untouched():
    before = (_snapshot(CONSTITUTIONS_DIR), _snapshot(PARAMS_DIR))
    yield
    assert (_snapshot(CONSTITUTIONS_DIR), _snapshot(PARAMS_DIR)) == before


@pytest.fixture
def dirs(tmp_path) -> authoring.PersonaDirs:
    """Temporary copies of the repository's constitutions/ and params/."""
    shutil.copytree(CONSTITUTIONS_DIR, tmp_path / "constitutions")
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    return authoring.PersonaDirs(tmp_path / "constitutions", tmp_path / "params")


def flags(dirs: authoring.PersonaDirs) -> list[str]:
    return ["--constitutions-dir", str(dirs.constitutions), "--params-dir", str(dirs.params)]


def cli(capsys, dirs: authoring.PersonaDirs, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["persona", *args, *flags(dirs)])
    out, err = capsys.readouterr()
    return code, out, err


def fill_skeleton(path: Path) -> None:
    """Replace every quoted slot of a fresh skeleton, in file order, by our own text."""
    texts = {
        "ONE_LINE_DESCRIPTION": iter([DESCRIPTION]),
        "FIRST_PERSON_TRAIT": iter(TRAITS),
        "USER_PROMPT": iter(PROMPTS),
        "EXAMPLE_USER_MESSAGE": iter(p for p, _ in EXAMPLES),
        "IN_PERSONA_REPLY": iter(r for _, r in EXAMPLES),
    }
    source = path.read_text(encoding="utf-8")
    filled = re.sub(r'"\{([A-Z_]+)\}"', lambda m: json.dumps(next(texts[m.group(1)])), source)
    path.write_text(filled, encoding="utf-8")


def new_filled(capsys, dirs: authoring.PersonaDirs) -> Path:
    code, _, err = cli(capsys, dirs, "new", NAME)
    assert code == 0, err
    path = dirs.constitution_file(NAME)
    fill_skeleton(path)
    return path


def table_rows(output: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) \| ", output, re.M)]


# -- new ------------------------------------------------------------------------------------------
def test_new_writes_a_commented_skeleton_and_a_params_file_that_run_accepts(capsys, dirs):
    code, out, _ = cli(capsys, dirs, "new", NAME)
    assert code == 0
    constitution_file, params_file = dirs.constitution_file(NAME), dirs.params_file(NAME)
    assert f"wrote {constitution_file} and {params_file}" in out
    text = constitution_file.read_text(encoding="utf-8")
    assert text.count("\n#") > 20  # explained in comments
    data = yaml.safe_load(text)  # valid YAML ...
    assert data["name"] == NAME and len(data["assertions"]) == 5
    assert all(len(a["prompts"]) == 5 for a in data["assertions"])
    with pytest.raises(DataError, match="template placeholders"):  # ... that no run accepts
        load_constitution(str(constitution_file))
    params = load_params("tiny", NAME, params_dir=dirs.params)  # no more "unknown persona"
    assert dirs.resolve_ref(params.constitution_ref) == constitution_file


def test_check_lists_every_slot_left_in_a_fresh_skeleton_by_field(capsys, dirs):
    cli(capsys, dirs, "new", NAME, "--assertions", "3", "--description", DESCRIPTION)
    code, out, _ = cli(capsys, dirs, "check", NAME)
    assert code == 1
    label = str(dirs.constitution_file(NAME))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {label}: assertions[{i}].{field}: expected your own text, found the slot {slot}"
        for i in range(3)
        for field, slot in (("text", "{FIRST_PERSON_TRAIT}"), ("prompts[0..4]", "{USER_PROMPT}"))
    ] + [
        f"error: {label}: examples[{k}].{field}: expected your own text, found the slot {slot}"
        for k in range(3)
        for field, slot in (("prompt", "{EXAMPLE_USER_MESSAGE}"), ("reply", "{IN_PERSONA_REPLY}"))
    ]
    assert out.splitlines()[-1] == "FAIL: 12 errors, 0 warnings"


def test_a_filled_skeleton_passes_check_and_notebook_01_runs_on_it(capsys, dirs, tmp_path):
    from character_training.runner import run_notebook

    new_filled(capsys, dirs)
    code, out, _ = cli(capsys, dirs, "check", NAME, "--strict")
    assert code == 0, out
    assert out.splitlines()[-1] == "OK: 0 errors, 0 warnings"
    assert "5 assertions, 25 prompts, 3 example exchanges" in out.splitlines()[0]

    code, out, _ = cli(capsys, dirs, "list")
    assert re.search(rf"^{NAME}\s+5\s+3\s+no\s+yes\s+Stoic$", out, re.M)

    tiny = "tiny-random"
    params = with_overrides(
        load_params("tiny", NAME, params_dir=dirs.params),
        {
            **SMOKE_OVERRIDES,
            **{role: tiny for role in ("student", "teacher", "generator", "judge")},
            "runs_dir": str(tmp_path / "runs"),
            "reports_dir": str(tmp_path / "reports"),
        },
    )
    result = run_notebook(params, "01_prompts", timeout=300)
    assert result.status == "ok", result.describe()
    records = [
        json.loads(line)
        for line in (params.run_dir / "01_prompts" / "constitution_prompts.jsonl")
        .read_text()
        .splitlines()
    ]
    hand_written = [r["prompt"] for r in records if r["source"] == "hand-written"]
    assert hand_written == PROMPTS
    assert {r["persona"] for r in records} == {NAME}


def test_new_refuses_to_overwrite_either_file_without_force(capsys, dirs):
    dirs.params_file(NAME).write_text("constitution: stoic\n", encoding="utf-8")
    code, _, err = cli(capsys, dirs, "new", NAME)
    assert code == 2
    assert err == (
        f"error: {dirs.params_file(NAME)} already exists: expected new files, nothing was "
        "written; pass --force to overwrite, or choose another name\n"
    )
    assert not dirs.constitution_file(NAME).exists()  # refused before writing anything

    code, _, _ = cli(capsys, dirs, "new", NAME, "--force")
    assert code == 0
    filled = dirs.constitution_file(NAME)
    fill_skeleton(filled)
    before = filled.read_text(encoding="utf-8")
    code, _, err = cli(capsys, dirs, "new", NAME)
    assert code == 2 and "already exist:" in err and "--force" in err
    assert filled.read_text(encoding="utf-8") == before
    code, _, err = cli(capsys, dirs, "new", NAME, "--params-only")
    assert code == 2 and "already exists" in err


def test_new_on_an_existing_constitution_points_to_params_only(capsys, dirs):
    target = dirs.constitution_file("sarcastic")
    before = target.read_text(encoding="utf-8")
    dirs.params_file("sarcastic").unlink()
    code, _, err = cli(capsys, dirs, "new", "sarcastic")
    assert code == 2 and "run `persona new sarcastic --params-only`" in err
    assert cli(capsys, dirs, "new", "sarcastic", "--params-only")[0] == 0
    assert target.read_text(encoding="utf-8") == before
    assert cli(capsys, dirs, "check", "sarcastic", "--strict")[0] == 0


def test_new_refuses_a_name_that_is_not_a_slug(capsys, dirs):
    code, _, err = cli(capsys, dirs, "new", "Stoic Sage")
    assert code == 2
    assert err.startswith("error: persona name 'Stoic Sage': expected a lowercase slug")
    assert not list(dirs.constitutions.glob("Stoic*"))


# -- import ---------------------------------------------------------------------------------------
def upstream_file(tmp_path: Path, questions: int = 5) -> Path:
    entries = [
        {"trait": trait, "questions": PROMPTS[5 * i : 5 * i + questions], "clarification": "x"}
        for i, trait in enumerate(TRAITS[:3])
    ]
    path = tmp_path / "stoic_upstream.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def test_import_writes_both_files_which_load_and_checks_them(capsys, dirs, tmp_path):
    source = upstream_file(tmp_path)
    code, out, _ = cli(
        capsys, dirs, "import", str(source), "--name", NAME, "--description", "Calm."
    )
    assert code == 0
    constitution_file, params_file = dirs.constitution_file(NAME), dirs.params_file(NAME)
    assert f"wrote {constitution_file} (3 assertions, 15 prompts) and {params_file}" in out
    assert load_constitution(str(constitution_file)) == import_upstream(source, NAME, "Calm.")
    params = load_params("tiny", NAME, params_dir=dirs.params)
    assert dirs.resolve_ref(params.constitution_ref) == constitution_file
    # the follow-up check: upstream files have no demonstrations, the tiny teacher wants 2
    assert f"warning: {constitution_file}: examples: expected at least 2 example exchanges" in out
    assert out.splitlines()[-1] == "OK: 0 errors, 1 warning"


def test_import_refuses_to_overwrite_without_force(capsys, dirs, tmp_path):
    source = upstream_file(tmp_path)
    assert cli(capsys, dirs, "import", str(source), "--name", NAME)[0] == 0
    constitution_file = dirs.constitution_file(NAME)
    constitution_file.write_text("# hand edits\n" + constitution_file.read_text(), "utf-8")
    edited = constitution_file.read_text(encoding="utf-8")
    code, _, err = cli(capsys, dirs, "import", str(source), "--name", NAME)
    assert code == 2 and "already exist: expected new files, nothing was written" in err
    assert constitution_file.read_text(encoding="utf-8") == edited
    assert cli(capsys, dirs, "import", str(source), "--name", NAME, "--force")[0] == 0
    assert constitution_file.read_text(encoding="utf-8") != edited


def test_import_of_a_broken_upstream_file_writes_nothing(capsys, dirs, tmp_path):
    source = tmp_path / "broken.json"
    entries = [{"trait": "Be calm.", "questions": [p]} for p in PROMPTS[:3]]
    source.write_text(json.dumps(entries), "utf-8")
    code, _, err = cli(capsys, dirs, "import", str(source), "--name", NAME)
    assert code == 2
    assert err.startswith(f"error: {source}: [0].trait: expected a first-person statement")
    assert not dirs.constitution_file(NAME).exists() and not dirs.params_file(NAME).exists()


def test_an_import_with_uneven_question_counts_is_flagged_the_way_stage_01_loads_it(
    capsys, dirs, tmp_path
):
    code, out, _ = cli(capsys, dirs, "import", str(upstream_file(tmp_path, 3)), "--name", NAME)
    assert code == 0
    assert (
        f"error: {dirs.constitution_file(NAME)}: assertions[0].prompts: expected exactly 5 "
        "user prompts, found 3" in out
    )
    assert cli(capsys, dirs, "check", NAME)[0] == 1


# -- check ----------------------------------------------------------------------------------------
def test_check_flags_a_near_duplicate_across_assertions_and_strict_fails_on_it(capsys, dirs):
    path = new_filled(capsys, dirs)
    original = PROMPTS[13]  # assertions[2].prompts[3]
    near = original.replace("12%", "15%")
    path.write_text(path.read_text(encoding="utf-8").replace(PROMPTS[24], near), "utf-8")
    code, out, _ = cli(capsys, dirs, "check", NAME)
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"warning: {path}: assertions[4].prompts[4]: expected a prompt distinct from the "
        "others, found a near-duplicate of assertions[2].prompts[3] (similarity 0."
    )
    assert ">= prompts.dedup_threshold 0.8" in warnings[0]
    assert out.splitlines()[-1] == "OK: 0 errors, 1 warning"
    code, out, _ = cli(capsys, dirs, "check", NAME, "--strict")
    assert code == 1
    assert out.splitlines()[-1] == "FAIL: 0 errors, 1 warning (--strict: warnings fail)"


def test_check_exits_1_on_a_malformed_file_with_the_loaders_one_line(capsys, dirs, tmp_path):
    path = new_filled(capsys, dirs)
    broken = tmp_path / f"{NAME}.yaml"
    broken.write_text(
        path.read_text(encoding="utf-8").replace("requires_opt_in: false", 'requires_opt_in: "no"'),
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_constitution(str(broken))
    code, out, _ = cli(capsys, dirs, "check", str(broken))
    assert code == 1
    assert f"error: {info.value}" in out.splitlines()
    assert str(info.value) == f"{broken}: requires_opt_in: expected true or false, found str"


def test_check_warns_about_thin_assertions_and_too_few_demonstrations(capsys, dirs):
    path = new_filled(capsys, dirs)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["assertions"][1]["text"] = "I am calm."
    data["assertions"][3]["text"] = "I " + " ".join(["stay calm"] * 45) + "."
    data["examples"] = data["examples"][:1]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    code, out, _ = cli(capsys, dirs, "check", NAME)
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert [w.split(": ")[2] for w in warnings] == [
        "assertions[1].text",
        "assertions[3].text",
        "examples",
    ]
    assert "found 3: 'I am calm.'" in warnings[0]
    assert "found 91 (split it into several assertions)" in warnings[1]
    assert "teacher_few_shot=2 before every prompt, found 1; add 1 in-persona" in warnings[2]
    # a preset whose teacher needs no demonstrations does not ask for them
    code, out, _ = cli(capsys, dirs, "check", NAME, "--set", "teacher_few_shot=0")
    assert "examples:" not in out


def test_check_of_a_persona_without_params_file_says_how_to_write_it(capsys, dirs):
    path = new_filled(capsys, dirs)
    dirs.params_file(NAME).unlink()
    code, out, _ = cli(capsys, dirs, "check", NAME)
    assert code == 1
    assert (
        f"error: {dirs.params_file(NAME)}: expected the persona params file that run and "
        f"dry-run read, found no file; write it with `python -m character_training persona "
        f"new {NAME} --params-only`"
    ) in out.splitlines()
    assert cli(capsys, dirs, "new", NAME, "--params-only")[0] == 0
    assert cli(capsys, dirs, "check", NAME)[0] == 0
    assert path.is_file()


def test_check_of_an_unknown_size_is_a_usage_error(capsys, dirs):
    new_filled(capsys, dirs)
    code, _, err = cli(capsys, dirs, "check", NAME, "--size", "huge")
    assert code == 2 and err.startswith("error: unknown model size 'huge': expected one of [")


# -- preview --------------------------------------------------------------------------------------
def test_the_preview_samples_the_pipelines_teacher_conversation(capsys, dirs):
    new_filled(capsys, dirs)
    params = load_params("tiny", NAME, params_dir=dirs.params)
    constitution = persona_preview.load_run_constitution(params, dirs)
    plan = persona_preview.preview_plan(params, constitution, count=7)
    # first prompt of each assertion, then the second ones
    assert [i.prompt for i in plan.items] == [PROMPTS[0], *PROMPTS[5::5], PROMPTS[1], PROMPTS[6]]
    item = plan.items[2]
    assert list(item.teacher_messages) == teacher_messages(
        constitution, "SmolLM", item.prompt, params.teacher_few_shot
    )
    roles = [m["role"] for m in item.teacher_messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert item.teacher_messages[1]["content"] == EXAMPLES[0][0]
    assert list(item.student_messages) == [{"role": "user", "content": item.prompt}]


def test_preview_prints_one_row_per_prompt_with_tiny_random(capsys, dirs, tmp_path):
    new_filled(capsys, dirs)
    code, out, err = cli(
        capsys,
        dirs,
        "preview",
        NAME,
        "--prompts",
        "3",
        "--max-tokens",
        "8",
        "--width",
        "100",
        "--set",
        "student=tiny-random",
        "--set",
        "teacher=tiny-random",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert code == 0, err
    assert table_rows(out) == [1, 2, 3]
    assert "teacher: tiny-random with the 'Stoic' constitution" in out
    assert "2 example exchanges before the prompt" in out
    assert "# | prompt (assertion)" in out and "(trait-03)" in out
    assert max(len(line) for line in out.splitlines() if " | " in line) <= 100
    assert "preview on" not in out  # the local backend costs nothing: no estimate, no question


def tinker_size(params_dir: Path) -> str:
    only_params = authoring.PersonaDirs(params=params_dir)
    for size in available_sizes(params_dir):
        if authoring.size_params(size, NAME, dirs=only_params).backend == "tinker":
            return size
    pytest.skip("no Tinker size preset in params/models")


def test_a_paid_preview_needs_yes_when_stdin_is_not_a_terminal(capsys, dirs, monkeypatch):
    new_filled(capsys, dirs)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    size = tinker_size(dirs.params)
    code, out, err = cli(capsys, dirs, "preview", NAME, "--size", size)
    assert code == 2
    assert out.startswith(f"preview on tinker ({size}): 4 teacher + 4 student samples")
    assert err == (
        "error: persona preview on Tinker costs money: pass --yes to confirm (stdin is not a "
        "terminal, so no question is asked)\n"
    )
    # with --yes it goes on to the backend, which here stops at the missing key
    code, _, err = cli(capsys, dirs, "preview", NAME, "--size", size, "--yes")
    assert code == 2 and "TINKER_API_KEY" in err
