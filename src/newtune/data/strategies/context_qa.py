"""Question answering over a context: context_qa, context_qa.load_v2, context_qa.load_404."""

from __future__ import annotations

from typing import Any

from newtune.data.strategies.base import text_field
from newtune.data.strategies.instruct import Instruct, PromptStyle
from newtune.data.strategies.registry import register

CONTEXT_SYSTEM = "Use the following contextual information to concisely answer the question.\n"
NOT_IN_CONTEXT = (
    "The context provided does not contain any information about your inquiry. "
    "Therefore, I'm unable to answer your question based on the given context."
)


@register("context_qa")
class ContextQA(Instruct):
    """article, question, answer: the article and question joined by `\\n===\\n`, chat style."""

    default_style = "chat"
    system_prompt = CONTEXT_SYSTEM
    system_no_input_prompt = CONTEXT_SYSTEM

    def required_columns(self) -> list[str]:
        return ["article", "question", "answer"]

    def fields(self, row: dict[str, Any]) -> tuple[str, str, str]:
        instruction = text_field(row, "article") + "\n===\n" + text_field(row, "question")
        return instruction, "", text_field(row, "answer")


@register("context_qa.load_404")
class ContextQA404(ContextQA):
    """article, unanswerable_question: the answer says the context does not tell."""

    def required_columns(self) -> list[str]:
        return ["article", "unanswerable_question"]

    def fields(self, row: dict[str, Any]) -> tuple[str, str, str]:
        article, question = text_field(row, "article"), text_field(row, "unanswerable_question")
        return article + "\n===\n" + question, "", NOT_IN_CONTEXT


@register("context_qa.load_v2")
class ContextQAV2(Instruct):
    """context, question, answer: "Context: ...\\nQuestion: ...\\n" -> "Answer: ..."."""

    system_prompt = ""
    system_no_input_prompt = ""

    def prompt_style(self) -> PromptStyle:
        return PromptStyle(turn="{instruction}\n{input}", turn_no_input="{instruction}", system="")

    def required_columns(self) -> list[str]:
        return ["context", "question", "answer"]

    def fields(self, row: dict[str, Any]) -> tuple[str, str, str]:
        instruction = (
            "Context: " + text_field(row, "context") + "\nQuestion: " + text_field(row, "question")
        )
        return instruction + "\n", "", "Answer: " + text_field(row, "answer")
