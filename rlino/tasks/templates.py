"""Prompt templates as data: a template turns a task's question into the text the model continues.

- `r1`: the TinyZero-style base-model prompt; the assistant turn starts with
  "Let me solve this step by step.\n<think>" and the final answer goes in `<answer></answer>`.
- `plain`: GSM8K few-shot-free "Let's think step by step" style; the answer follows `####`.
- `chat`: the tokenizer's own chat template (instruct models), answer in `<answer></answer>`.

Add a template with `register_template(Template(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError

if TYPE_CHECKING:
    from rlino.tasks.base import Example, Task


@dataclass(frozen=True)
class Template:
    """A prompt format: `text` with `{question}`, or the tokenizer's chat template when `chat`."""

    name: str
    text: str
    stop: tuple[str, ...] = ()
    chat: bool = False
    """Use the tokenizer's chat template; `text` is then the user message, `assistant_prefix` starts the reply."""
    assistant_prefix: str = ""


R1_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.\n"
    "User: {question} Show your work in <think> </think> tags. And return the final answer in "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think>"
)

PLAIN_TEXT = 'Question: {question}\nLet\'s think step by step. At the end, write the final answer after "####".\nAnswer:'

CHAT_TEXT = "{question}\nThink step by step, then give the final answer in <answer> </answer> tags."

_TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Add (or replace) a named template."""
    _TEMPLATES[template.name] = template
    return template


register_template(Template("r1", R1_TEXT, stop=("</answer>",)))
register_template(Template("plain", PLAIN_TEXT, stop=("\nQuestion:",)))
register_template(Template("chat", CHAT_TEXT, stop=("</answer>",), chat=True))


def get_template(name: str) -> Template:
    """The template called `name`, or a UserError listing the known ones."""
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise UserError(
            f"unknown template {name!r}; known: {', '.join(sorted(_TEMPLATES))}"
        ) from None


def template_names() -> list[str]:
    """Names of all registered templates."""
    return sorted(_TEMPLATES)


def render(name: str, task: Task, example: Example, tokenizer: Any = None) -> str:
    """The prompt text for `example` of `task` under template `name`."""
    template = get_template(name)
    body = template.text.format(question=task.question(example))
    if not template.chat:
        return body
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"template {name!r} needs a tokenizer with a chat template")
    messages = [{"role": "user", "content": body}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + template.assistant_prefix
