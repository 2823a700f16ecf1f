"""Creative answer / critique / revise (creative_acr.load_answer, .load_critique, .load_revise)."""

from __future__ import annotations

from typing import Any, ClassVar

import yaml

from newtune.data.strategies.base import (
    Segments,
    Strategy,
    prompt_and_response,
    prompt_only,
    text_field,
)
from newtune.data.strategies.registry import register

ANSWER_SYSTEM = (
    "Answer the following question in a comprehensive, in-depth, and creative way. Additionally "
    "your response should be relevant, accurate, and free of any ambiguity."
)
CRITIQUE_PROMPT = """Given the following Question and Response, critique the Response on a scale of 1-10. You should critique the answer in the following criteria:
refusal: whether the Response refuses to answer the Question. Responses containing language similar to "As an AI language model, I am not capable of ..." is a form of refusal and should have a low refusal score. 10 is no refusal, 0 is refuses to answer the question.
prescriptive bias: whether the Response attempts to prescribe or dictate certain actions or behaviors of the user. 10 no prescriptive bias present, 0 means there is prescriptive bias.
creativity: score how creative the Response is. 10 is most creative, 0 lacks creativity
comprehensiveness: score how comprehensive and in-depth the Response is. 10 is most comprehensive and in-depth, 0 lacks coverage and depth
Then for each criteria, give a detailed explanation of why the response doesn't meet the criteria (don't reference the score), what it did right, and how it could be improved for that criteria.

Output your answer in YAML format like so:
scores:
  refusal: <0-10>
  prescriptive_bias: <0-10>
  creativity: <0-10>
  comprehensiveness: <0-10>
critiques:
  refusal:
    explanation: ...
    improvements: ...
  prescriptive_bias:
    explanation: ...
    improvements: ...
  creativity:
    explanation: ...
    improvements: ...
  comprehensiveness:
    explanation: ...
    improvements: ...

Question: {question}
Answer: {answer}
"""
REVISE_PROMPT = """Definitions:
refusal: whether the Response refuses to answer the Question. Responses containing language similar to "As an AI language model, I am not capable of ..." is a form of refusal and should have a low refusal score. 10 is no refusal, 0 is refuses to answer the question.
prescriptive bias: whether the Response attempts to prescribe or dictate certain actions or behaviors of the user. 10 no prescriptive bias present, 0 means their is prescriptive bias.
creativity: score how creative the Response is. 10 is most creative, 0 lacks creativity
comprehensiveness: score how comprehensive and in-depth the Response is. 10 is most comprehensive and in-depth, 0 lacks coverage and depth

Given the following Question, Response, and Evaluation, revise the Response based on the Evaluation and recommendations for improvements. Reply only with the revised response.

Question: {question}
Answer: {answer}
Evaluation:
{evaluation}
"""


def evaluation(row: dict[str, Any]) -> str:
    """The row's scores and critiques as YAML, as Axolotl dumps them."""
    dump = {"default_flow_style": False, "Dumper": yaml.Dumper}
    return yaml.dump(row.get("scores"), **dump) + yaml.dump(row.get("critiques"), **dump)


class _Creative(Strategy):
    """`[system\\n]USER: {instruction}\\nASSISTANT:` followed by the response."""

    system: ClassVar[str] = ""

    def build_prompt(self, instruction: str) -> str:
        """The prompt for one instruction."""
        head = f"{self.system}\n" if self.system else ""
        return f"{head}USER: {instruction}\nASSISTANT:"

    def prompt(self, text: str, history: list[dict[str, str]] | None = None) -> Segments:
        return prompt_only(self.build_prompt(text))


@register("creative_acr.load_answer")
class CreativeAnswer(_Creative):
    """instruction -> revision (the revised answer)."""

    system = ANSWER_SYSTEM

    def required_columns(self) -> list[str]:
        return ["instruction", "revision"]

    def sample(self, row: dict[str, Any]) -> Segments:
        prompt = self.build_prompt(text_field(row, "instruction"))
        return prompt_and_response(prompt, text_field(row, "revision"), self.train_on_inputs)


@register("creative_acr.load_critique")
class CreativeCritique(_Creative):
    """instruction, answer -> scores and critiques (YAML)."""

    def required_columns(self) -> list[str]:
        return ["instruction", "answer", "scores", "critiques"]

    def sample(self, row: dict[str, Any]) -> Segments:
        question = CRITIQUE_PROMPT.format(
            question=text_field(row, "instruction"), answer=text_field(row, "answer")
        )
        return prompt_and_response(
            self.build_prompt(question), evaluation(row), self.train_on_inputs
        )


@register("creative_acr.load_revise")
class CreativeRevise(_Creative):
    """instruction, answer, scores, critiques -> revision."""

    def required_columns(self) -> list[str]:
        return ["instruction", "answer", "scores", "critiques", "revision"]

    def sample(self, row: dict[str, Any]) -> Segments:
        question = REVISE_PROMPT.format(
            question=text_field(row, "instruction"),
            answer=text_field(row, "answer"),
            evaluation=evaluation(row),
        )
        return prompt_and_response(
            self.build_prompt(question), text_field(row, "revision"), self.train_on_inputs
        )
