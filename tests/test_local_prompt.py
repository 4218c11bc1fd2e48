"""How the local provider prompts the base model, without running it: the answer style a
question gets, and which example answers count as copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from openfusion import Settings
from openfusion.prompts import PromptSet
from openfusion.providers.local import LocalProvider, _unrelated_answers, answer_style
from openfusion.types import CompletionRequest, Message

EXAMPLES = {"leo tolstoy", "jupiter", "1989", "iron", "7"}


def prompt_for(question: str, settings: Settings) -> str:
    provider = LocalProvider({}, PromptSet(settings.prompt_dirs))
    request = CompletionRequest("m", (Message("system", "Be brief."), Message("user", question)))
    prompt, _ = provider._prompt(request, ())
    return prompt


@pytest.mark.parametrize(
    ("question", "style"),
    [
        ("Who wrote Emma?", "short"),
        ("How many legs does a spider have?", "short"),
        ("What is 12 times 7?", "short"),
        ("Why is the sky blue?", "long"),
        ("How does a vaccine work?", "long"),
        ("Explain the offside rule.", "long"),
        ("Compare tea and coffee.", "long"),
    ],
)
def test_a_question_gets_the_answer_length_it_asks_for(question: str, style: str) -> None:
    assert answer_style(question) == style


def test_short_questions_get_short_examples_and_end_on_the_answer_cue(settings: Settings) -> None:
    prompt = prompt_for("Who wrote Emma?", settings)
    assert prompt.startswith("Be brief.\n")  # the shared prefix first: the cache reuses it
    assert prompt.endswith("\nQ: Who wrote Emma?\nA:")
    assert "\nA: Leo Tolstoy\n" in prompt
    assert "Question:" not in prompt
    long = prompt_for("Why do leaves change colour?", settings)
    assert "Leo Tolstoy" not in long and "The Earth's axis is tilted" in long


def test_an_example_answer_is_a_copy_only_for_an_unrelated_question(settings: Settings) -> None:
    unrelated = _unrelated_answers(
        prompt_for("What shade of blue is named after a city?", settings)
    )
    assert unrelated == EXAMPLES
    related = _unrelated_answers(prompt_for("Which Russian author wrote Anna Karenina?", settings))
    assert "leo tolstoy" not in related  # shares "wrote": Tolstoy may be right
    assert "jupiter" in related
    element = _unrelated_answers(prompt_for("What element is a magnet made of?", settings))
    assert "iron" not in element and "leo tolstoy" in element


def test_the_prompts_of_capable_models_carry_no_few_shot_examples(tmp_path: Path) -> None:
    prompts = PromptSet(Settings(tmp_path, tmp_path).prompt_dirs)
    system = prompts.render(
        "panel_system", question="Who wrote Emma?", member_index=0, panel_size=3, tools=[]
    )
    synthesis = prompts.render(
        "synthesis",
        question="Who wrote Emma?",
        responses=[{"label": "Response A", "content": "Jane Austen"}],
        analysis=None,
        analysis_json="",
        sources=[],
    )
    for text in (system, synthesis):
        assert "Leo Tolstoy" not in text and "\nQ: " not in text
