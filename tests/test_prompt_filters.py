"""Tests for cleaning the user prompts a generator model writes in stage 01.

The failure these guard against: a blog replication of character training kept generator
output almost as is, and many of its "user prompts" turned out to be assistant replies
("Sure, here's a poem..."), flattery aimed at the assistant ("You're so wise, tell me...") or
numbered essay headings ("1. Introduction: Introduce your thesis"). Training a model to answer
those in character teaches it the wrong thing, and the reference code's ``except: continue``
made such losses invisible. So each test pins down both what is kept and what is dropped, with
the reason, for realistic messy generations written out below.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from character_training.errors import ConfigError, DataError
from character_training.prompt_filters import (
    MAX_WORDS,
    MIN_CHARS,
    MIN_WORDS,
    PARSE_REASONS,
    REQUEST_REASONS,
    DedupResult,
    FilterReport,
    ParseResult,
    classify_request,
    deduplicate,
    distinct_records,
    filter_requests,
    jaccard,
    near_duplicate_groups,
    normalize_prompt,
    parse_generated_prompts,
    shingles,
    similarity,
)

REPO = Path(__file__).resolve().parents[1]


def reasons(result: ParseResult) -> list[str]:
    return [reason for _, reason in result.dropped]


# --- parsing generator output ----------------------------------------------------------------


def test_numbered_list_loses_its_preamble_and_outro_and_keeps_every_item():
    text = """Sure! Here are 5 more prompts in the same style:

1. How do I tell my roommate to stop eating my food without starting a fight?
2. What's a good way to apologize to a friend I ghosted for months?
3. Can you help me write a birthday message for my dad, who hates fuss?
4. Why do I always procrastinate on things I actually care about?
5. My boss keeps ignoring my emails.

I hope these help! Let me know if you'd like more."""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How do I tell my roommate to stop eating my food without starting a fight?",
        "What's a good way to apologize to a friend I ghosted for months?",
        "Can you help me write a birthday message for my dad, who hates fuss?",
        "Why do I always procrastinate on things I actually care about?",
        "My boss keeps ignoring my emails.",
    )
    assert result.dropped == (
        ("Sure! Here are 5 more prompts in the same style:", "preamble"),
        ("I hope these help! Let me know if you'd like more.", "closing"),
    )


def test_bullets_lose_bold_labels_emphasis_and_wrapping_quotes():
    text = """Here are some prompts:

- **Career:** How do I negotiate a higher salary for a job offer?
* **Travel** - What should I pack for a week of hiking in Scotland?
• **"Explain how vaccines train the immune system."**
- *What is the difference between weather and climate?*
- What does `2**10` evaluate to in Python?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How do I negotiate a higher salary for a job offer?",
        "What should I pack for a week of hiking in Scotland?",
        "Explain how vaccines train the immune system.",
        "What is the difference between weather and climate?",
        "What does `2**10` evaluate to in Python?",
    )
    assert reasons(result) == ["preamble"]


def test_json_array_in_a_code_fence_is_read_as_json_and_bad_elements_are_reported():
    text = """Of course! Here is the list as JSON:

```json
[
  "Write a limerick about a cat who hates Mondays.",
  "How many cups are in a gallon?",
  "",
  42,
  "My sister says \\"literally\\" now means \\"figuratively\\". Is she right?"
]
```

Each of these prompts targets a different skill."""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "Write a limerick about a cat who hates Mondays.",
        "How many cups are in a gallon?",
        'My sister says "literally" now means "figuratively". Is she right?',
    )
    assert result.dropped == (
        ("Of course! Here is the list as JSON:", "preamble"),
        ("```json", "markup"),
        ('""', "empty-item"),
        ("42", "not-a-string"),
        ("```", "markup"),
        ("Each of these prompts targets a different skill.", "closing"),
    )


def test_a_bare_json_object_holding_one_list_is_read_too():
    text = json.dumps({"prompts": ["1. What is a black hole?", "Why do cats purr?"]})
    result = parse_generated_prompts(text)
    assert result.prompts == ("What is a black hole?", "Why do cats purr?")
    assert result.dropped == ()


def test_multi_line_items_are_joined_and_keep_their_inner_layout():
    text = """1. I'm writing a wedding toast for my sister. Here's my opening line:
   "We are gathered here to celebrate two people who never agree on anything."
   Can you make it warmer?
2. Translate this to French:

   Where is the nearest train station?
3. Fix the bug in this function:
   ```python
   def add(a, b):
       return a - b
   ```
4. I'm planning a trip with constraints:
- budget under $2000
- two kids under 6
Where should we go in July?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "I'm writing a wedding toast for my sister. Here's my opening line:\n"
        '"We are gathered here to celebrate two people who never agree on anything."\n'
        "Can you make it warmer?",
        "Translate this to French:\n\nWhere is the nearest train station?",
        "Fix the bug in this function:\n```python\ndef add(a, b):\n    return a - b\n```",
        "I'm planning a trip with constraints:\n- budget under $2000\n- two kids under 6\n"
        "Where should we go in July?",
    )
    assert result.dropped == ()


def test_one_quoted_prompt_per_line_loses_straight_curly_and_single_quotes():
    text = """"How do I stop my dog from barking at the mailman?"
"What's the tallest mountain in Africa?",
'Can you recommend a podcast about ancient Rome?'
“Is it safe to eat raw cookie dough?”
"Hamlet" or "Macbeth": which should I read first?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How do I stop my dog from barking at the mailman?",
        "What's the tallest mountain in Africa?",
        "Can you recommend a podcast about ancient Rome?",
        "Is it safe to eat raw cookie dough?",
        '"Hamlet" or "Macbeth": which should I read first?',
    )
    assert result.dropped == ()


def test_mixed_numbering_styles_in_one_list_all_start_items():
    text = """1. What causes the northern lights?
2) How do I make cold brew coffee at home?
(3) Can you explain recursion with a simple example?
Q4: Why do onions make you cry?
**5.** Should I learn Spanish or Mandarin first?
Prompt 6: What's the healthiest way to cook broccoli?
#7. Is 1.5 million people a lot for a city?
[8] User: At 10:30 tonight, which planets will be visible from Madrid?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "What causes the northern lights?",
        "How do I make cold brew coffee at home?",
        "Can you explain recursion with a simple example?",
        "Why do onions make you cry?",
        "Should I learn Spanish or Mandarin first?",
        "What's the healthiest way to cook broccoli?",
        "Is 1.5 million people a lot for a city?",
        "At 10:30 tonight, which planets will be visible from Madrid?",
    )
    assert result.dropped == ()


def test_code_asterisks_and_underscores_are_not_mistaken_for_bold():
    text = """1. What does __init__ do in Python?
2. __Quick question:__ why use *args and **kwargs?
3. Is 2**10 bigger than 10**3?"""
    assert parse_generated_prompts(text).prompts == (
        "What does __init__ do in Python?",
        "why use *args and **kwargs?",
        "Is 2**10 bigger than 10**3?",
    )


def test_a_truncated_generation_loses_its_last_item_even_if_it_looks_complete():
    text = """1. How do I start journaling if I've never done it before?
2. What are some fun things to do in Lisbon on a rainy day?
3. Can you explain how compound interest works with an example"""
    result = parse_generated_prompts(text, truncated=True)
    assert result.prompts == (
        "How do I start journaling if I've never done it before?",
        "What are some fun things to do in Lisbon on a rainy day?",
    )
    assert result.dropped == (
        ("3. Can you explain how compound interest works with an example", "truncated"),
    )
    assert len(parse_generated_prompts(text).prompts) == 3  # not truncated: all kept


def test_a_json_array_cut_by_max_tokens_falls_back_to_lines_and_drops_the_cut_element():
    text = """```json
[
  "What is the speed of light?",
  "How do I change a flat tire?",
  "Can you write a haiku about autu"""
    result = parse_generated_prompts(text, truncated=True)
    assert result.prompts == ("What is the speed of light?", "How do I change a flat tire?")
    assert result.dropped == (
        ("```json", "markup"),
        ("[", "markup"),
        ('"Can you write a haiku about autu', "truncated"),
    )


def test_truncation_spares_the_items_when_the_cut_fell_in_the_closing_chatter():
    text = "1. Why is the ocean salty?\n2. How do tides work?\n\nI hope these"
    result = parse_generated_prompts(text, truncated=True)
    assert result.prompts == ("Why is the ocean salty?", "How do tides work?")
    assert result.dropped == (("I hope these", "closing"),)


@pytest.mark.parametrize("text", ["", "   \n\n\t  \n"])
def test_empty_output_gives_nothing_and_drops_nothing(text):
    assert parse_generated_prompts(text) == ParseResult((), ())
    assert parse_generated_prompts(text, truncated=True) == ParseResult((), ())


def test_section_headings_between_groups_of_items_are_dropped_as_headings():
    text = """### Work
1. How do I ask my manager for feedback without sounding needy?
2. What's a polite way to decline an extra project?

**Family:**
3. How do I talk to my teenage son about vaping?

Some more on health:
4. Is it bad to run every single day?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How do I ask my manager for feedback without sounding needy?",
        "What's a polite way to decline an extra project?",
        "How do I talk to my teenage son about vaping?",
        "Is it bad to run every single day?",
    )
    assert result.dropped == (
        ("### Work", "heading"),
        ("**Family:**", "heading"),
        ("Some more on health:", "heading"),
    )


def test_numbered_group_titles_with_nested_bullets_yield_the_bullets():
    text = """1. **Cooking**
   - How long should I rest a steak after grilling?
   - What can I use instead of buttermilk?
2. **Money**
   - Is it better to pay off debt or save first?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How long should I rest a steak after grilling?",
        "What can I use instead of buttermilk?",
        "Is it better to pay off debt or save first?",
    )
    assert result.dropped == (("1. **Cooking**", "heading"), ("2. **Money**", "heading"))


def test_prompt_labels_on_their_own_line_take_the_text_below_them():
    text = """Prompt 1:
What is the best way to memorize vocabulary?

Prompt 2:

Can you explain the offside rule in soccer?
Prompt 3:"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "What is the best way to memorize vocabulary?",
        "Can you explain the offside rule in soccer?",
    )
    assert result.dropped == (("Prompt 3:", "empty-item"),)


def test_plain_lines_lose_chatter_recognised_by_its_wording():
    text = """Sure! Here are more prompts:
How do I fix a squeaky door hinge?
What is the plot of Hamlet in two sentences?
I hope these help!"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "How do I fix a squeaky door hinge?",
        "What is the plot of Hamlet in two sentences?",
    )
    assert result.dropped == (
        ("Sure! Here are more prompts:", "preamble"),
        ("I hope these help!", "closing"),
    )


def test_rules_are_markup_and_sign_off_chatter_right_after_the_last_item_is_cut_from_it():
    text = """1. Why is the ocean salty?
---
2. How do tides work?
Feel free to adapt these to your needs!"""
    result = parse_generated_prompts(text)
    assert result.prompts == ("Why is the ocean salty?", "How do tides work?")
    assert result.dropped == (
        ("---", "markup"),
        ("Feel free to adapt these to your needs!", "closing"),
    )


def test_text_that_only_resembles_a_marker_is_left_alone():
    text = "Q3 earnings were bad, what should I tell investors?\n10:30 is too late to eat, right?"
    assert parse_generated_prompts(text).prompts == tuple(text.split("\n"))


def test_chatter_between_items_is_an_interlude_not_part_of_the_item_above():
    text = """1. What's the best way to learn to touch type?

Now a few that are more personal.

2. How do I forgive my brother for missing my wedding?"""
    result = parse_generated_prompts(text)
    assert result.prompts == (
        "What's the best way to learn to touch type?",
        "How do I forgive my brother for missing my wedding?",
    )
    assert result.dropped == (("Now a few that are more personal.", "interlude"),)


def test_every_dropped_reason_is_a_documented_one():
    text = "Here:\n```\n1. **A**\n   - Why?\n2.\n\nBye, hope this helps\n```"
    result = parse_generated_prompts(text, truncated=True)
    assert result.dropped and set(reasons(result)) <= set(PARSE_REASONS)


def test_parsing_something_that_is_not_text_is_a_data_error():
    with pytest.raises(DataError, match="expected the generated text as str"):
        parse_generated_prompts(None)  # type: ignore[arg-type]


def test_the_blog_failure_an_essay_outline_parses_but_is_filtered_out_as_headings():
    text = """Here are 4 prompts:

1. Introduction: Introduce your thesis and why it matters.
2. Body Paragraph 1: Present your strongest evidence.
3. Conclusion: Summarize the key points.
4. The Ethics of Artificial Intelligence"""
    parsed = parse_generated_prompts(text)
    assert len(parsed.prompts) == 4
    kept, rejected = filter_requests(parsed.prompts)
    assert kept == ()
    assert [reason for _, reason in rejected] == ["heading"] * 4


# --- is it a user request? -------------------------------------------------------------------

GENUINE = [
    "Why is the sky blue?",
    "Explain taxes. Please.",
    "Tell me a joke.",
    "My boss keeps ignoring my emails.",
    "hey whats a good name for a goldfish",
    "You are a pirate captain; your crew is about to mutiny. Give them a rousing speech.",
    "You are a wise old wizard. A young apprentice asks you about the nature of magic.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Fix this: def f(x): return x**2",
    "Integrate 1/(x^2 + 4) dx.",
    "What's 17% of 240?",
    "This is the third time my order arrived broken. I'm done with this company.",
    "Here's my cover letter draft. Can you make it punchier?",
    "Here is my code:\nfor i in range(3) print(i)\nWhy does it fail?",
    "Background: I'm 35 and want to switch careers into data science. Where should I start?",
    "Step by step, how do I change a bike tire?",
    "Fill in the blank: The capital of Australia is ____.",
    "Can you help me plan a 5-day itinerary for Kyoto in November, with a focus on temples "
    "and food, on a mid-range budget? I'm traveling with my partner, who is vegetarian, and "
    "we'd like at least one day trip outside the city.",
    "Sorry if this is a dumb question, but how do vaccines work?",
    "I'm sorry, but I think your last answer was wrong about Pluto.",
    "If you're so smart, why can't you tell me tomorrow's lottery numbers?",
    "Sure-fire ways to make sourdough rise faster?",
    "Why does f'{name}' print the literal braces in my Python 3.5 script?",
]


@pytest.mark.parametrize("prompt", GENUINE)
def test_genuine_user_messages_are_accepted(prompt):
    assert classify_request(prompt) is None


BAD = [
    ("Hi!", "too-short"),
    ("Travel", "too-short"),
    ("Explain " + "this and " * 80 + "that.", "too-long"),
    ("Write a cover letter for [insert job title] at {COMPANY}.", "placeholder"),
    ("Dear {{name}}, please tell me about your day.", "placeholder"),
    ("Lorem ipsum dolor sit amet, consectetur.", "placeholder"),
    ("Here are 10 more prompts:", "meta"),
    ("Prompt 12", "meta"),
    ("These prompts cover a range of everyday situations.", "meta"),
    ("def f(x): return x**2", "not-english-text"),
    ("🙂🙂🙂 😂😂 👍👍👍 ok ok", "not-english-text"),
    ("你好，请问今天天气怎么样？我想出去走走。", "not-english-text"),
    ("Sure, here's a poem about the ocean: the waves roll in.", "assistant-reply"),
    ("Certainly! The capital of France is Paris.", "assistant-reply"),
    ("Of course. Photosynthesis is the process by which plants make food.", "assistant-reply"),
    ("As an AI language model, I don't have personal opinions.", "assistant-reply"),
    ("Great question! The answer depends on several factors.", "assistant-reply"),
    ("I'm sorry, but I can't help with that request.", "assistant-reply"),
    ("Hello! How can I assist you today?", "assistant-reply"),
    ("Here's a short story about a dragon who learns to fly.", "assistant-reply"),
    ("I'd be happy to help you plan your trip to Rome.", "assistant-reply"),
    ("You're so wise, tell me how black holes form.", "flattery-to-assistant"),
    ("You are the best assistant ever! What should I cook tonight?", "flattery-to-assistant"),
    (
        "I love how you explain things so clearly. Can you explain inflation?",
        "flattery-to-assistant",
    ),
    ("You're amazing. What's the meaning of life?", "flattery-to-assistant"),
    ("Introduction: Introduce your thesis and preview the main arguments.", "heading"),
    ("Step 3: Mix the dry ingredients into the wet ones.", "heading"),
    ("Questions about your childhood:", "heading"),
    ("The Role of Memory in Personal Identity", "heading"),
]


@pytest.mark.parametrize(("prompt", "expected"), BAD, ids=[reason for _, reason in BAD])
def test_non_requests_are_rejected_with_the_right_reason(prompt, expected):
    assert classify_request(prompt) == expected


def test_every_reason_code_is_exercised_and_documented():
    assert {reason for _, reason in BAD} == set(REQUEST_REASONS)


def test_length_bounds_sit_where_documented():
    assert classify_request("Why not?") is None  # 2 words, 8 characters
    assert classify_request("Why not") == "too-short"
    assert classify_request(" ".join(["word"] * MAX_WORDS)) != "too-long"
    assert classify_request(" ".join(["word"] * (MAX_WORDS + 1))) == "too-long"
    assert (MIN_WORDS, MIN_CHARS) == (2, 8)


def test_every_prompt_shipped_in_the_repository_passes_the_filter():
    """The hand-written prompts are the best sample of real requests we have: a filter that
    rejects any of them (beyond the documented length floor) is too eager."""
    prompts = []
    for path in sorted((REPO / "lib/character_training/data").glob("*.jsonl")):
        prompts += [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line]
    for path in sorted((REPO / "constitutions").glob("*.yaml")):
        for assertion in yaml.safe_load(path.read_text())["assertions"]:
            prompts += assertion.get("prompts", [])
    assert len(prompts) > 500
    long_enough = [p for p in prompts if len(p.split()) >= MIN_WORDS and len(p) >= MIN_CHARS]
    assert [(p, classify_request(p)) for p in long_enough if classify_request(p)] == []


def test_filter_requests_keeps_order_and_pairs_each_reject_with_its_reason():
    kept, rejected = filter_requests(
        ["Why do cats purr?", "Sure! Cats purr when content.", "How do owls see at night?"]
    )
    assert kept == ("Why do cats purr?", "How do owls see at night?")
    assert rejected == (("Sure! Cats purr when content.", "assistant-reply"),)


# --- duplicates ------------------------------------------------------------------------------

LANDLORD = (
    "My landlord hasn't fixed the broken heater in three weeks and it's getting really cold. "
    "How should I word a firm but polite email asking him to fix it?"
)


def test_normalize_prompt_ignores_case_spacing_typography_and_end_punctuation():
    assert normalize_prompt("  “How do I   bake BREAD?!”  ") == "how do i bake bread"
    assert normalize_prompt("What’s up?") == normalize_prompt("what's up")


def test_exact_duplicates_are_removed():
    result = deduplicate(["Why do cats purr?", "Why do cats purr?"])
    assert result == DedupResult(
        ("Why do cats purr?",), (("Why do cats purr?", "Why do cats purr?"),), ("duplicate",)
    )


def test_duplicates_differing_in_case_and_punctuation_are_removed():
    result = deduplicate(["How do I bake bread?", "how do i bake bread", "HOW DO I BAKE BREAD!!"])
    assert result.kept == ("How do I bake bread?",)
    assert result.removed == (
        ("how do i bake bread", "How do I bake bread?"),
        ("HOW DO I BAKE BREAD!!", "How do I bake bread?"),
    )
    assert result.reasons == ("duplicate", "duplicate")


def test_a_near_duplicate_with_one_word_changed_is_removed_at_the_default_threshold():
    variant = LANDLORD.replace("email", "letter")
    assert similarity(LANDLORD, variant) >= 0.8
    result = deduplicate([LANDLORD, variant])
    assert result.kept == (LANDLORD,)
    assert result.removed == ((variant, LANDLORD),)
    assert result.reasons == ("near-duplicate",)


def test_different_prompts_on_the_same_topic_are_both_kept():
    prompts = [
        "What flour is best for sourdough bread?",
        "How long should sourdough bread proof in the fridge?",
        "How do I ask my boss for a raise?",
        "How do I ask my boss for time off?",
    ]
    assert deduplicate(prompts).kept == tuple(prompts)


def test_prompts_near_an_existing_set_are_removed_and_the_set_is_not_returned():
    existing = ["Why do cats purr?", LANDLORD]
    prompts = ["why do cats purr", "What do cats dream about?", LANDLORD.replace("email", "note")]
    result = deduplicate(prompts, against=existing)
    assert result.kept == ("What do cats dream about?",)
    assert result.removed == (
        ("why do cats purr", "Why do cats purr?"),
        (LANDLORD.replace("email", "note"), LANDLORD),
    )
    assert result.reasons == ("existing", "existing")


def test_order_is_preserved_and_the_first_occurrence_wins():
    prompts = ["B: how do magnets work?", "A question about tides?", "b: How do magnets work"]
    result = deduplicate(prompts)
    assert result.kept == ("B: how do magnets work?", "A question about tides?")
    assert result.removed == (("b: How do magnets work", "B: how do magnets work?"),)


def naive_dedup(prompts, against, threshold):
    """Reference: compare each prompt with all of ``against``, then with every earlier kept
    prompt; within each, an exact (normal-form) match wins over the oldest similar one."""

    def first_match(candidates, normal, grams):
        exact = [c for c in candidates if normalize_prompt(c) == normal]
        similar = [c for c in candidates if jaccard(grams, shingles(c)) >= threshold]
        return (exact or similar or [None])[0]

    kept, removed = [], []
    for prompt in prompts:
        normal, grams = normalize_prompt(prompt), shingles(prompt)
        hit = first_match(against, normal, grams)
        if hit is None:
            hit = first_match(kept, normal, grams)
        if hit is None:
            kept.append(prompt)
        else:
            removed.append((prompt, hit))
    return tuple(kept), tuple(removed)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 1.0])
def test_the_indexed_search_finds_exactly_what_comparing_every_pair_finds(threshold):
    rng = random.Random(threshold)
    words = (
        "how do i can you why is the my best way to cook learn fix write plan a trip "
        "python bread dog email boss poem budget for with at home quickly today"
    ).split()
    seeds = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(40)]

    def variant() -> str:
        tokens = rng.choice(seeds).split()
        for _ in range(rng.randint(0, 2)):
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
        return " ".join(tokens) + rng.choice(["", "?", "!"])

    prompts, against = [variant() for _ in range(150)], [variant() for _ in range(10)]
    result = deduplicate(prompts, threshold=threshold, against=against)
    assert (result.kept, result.removed) == naive_dedup(prompts, against, threshold)


def test_near_duplicate_groups_list_the_kept_index_first():
    prompts = [
        "Why do cats purr?",
        "Tell me about owls.",
        "why do cats purr",
        LANDLORD,
        LANDLORD.replace("email", "letter"),
    ]
    assert near_duplicate_groups(prompts) == ((0, 2), (3, 4))


def test_distinct_records_keep_the_first_record_of_each_kept_text_in_order():
    records = [
        {"id": "a", "prompt": "Why do cats purr?"},
        {"id": "b", "prompt": LANDLORD},
        {"id": "c", "prompt": "Why do cats purr?"},  # the same text again: a duplicate
        {"id": "d", "prompt": LANDLORD.replace("email", "letter")},  # near-duplicate of b
        {"id": "e", "prompt": "Tell me about owls."},  # similar to an existing prompt
        {"id": "f", "prompt": "How do tides work?"},
    ]
    kept = distinct_records(records, lambda r: r["prompt"], against=["tell me about owls"])
    assert [r["id"] for r in kept] == ["a", "b", "f"]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_threshold_outside_zero_to_one_is_a_config_error(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        deduplicate(["a b c"], threshold=threshold)


# --- reporting -------------------------------------------------------------------------------


def test_filter_report_counts_every_drop_by_stage_and_reason_and_adds_up():
    parsed = parse_generated_prompts(
        "Here you go:\n1. Why do cats purr?\n2. Sure! Cats purr when happy.\n"
        "3. why do cats purr\n4. How do owls see at night?\n\nHope this helps!"
    )
    filtered = filter_requests(parsed.prompts)
    deduped = deduplicate(filtered.kept)
    report = FilterReport.from_results(parsed=[parsed], filtered=filtered, deduped=deduped)
    assert report.kept == 2
    assert report.dropped == 4
    assert report.as_rows() == [
        {"stage": "parse", "reason": "closing", "count": 1},
        {"stage": "parse", "reason": "preamble", "count": 1},
        {"stage": "filter", "reason": "assistant-reply", "count": 1},
        {"stage": "dedup", "reason": "duplicate", "count": 1},
        {"stage": "result", "reason": "kept", "count": 2},
    ]
    total = report + FilterReport.from_results(parsed=parsed)
    assert total.kept == 2 + 4
    assert total.as_dict()[("parse", "preamble")] == 2
