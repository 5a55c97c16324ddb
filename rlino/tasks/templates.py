"""Prompt templates as data: a template turns a task's question into the text the model continues.

- `r1`: the TinyZero-style base-model prompt; the assistant turn starts with
  "Let me solve this step by step.\n<think>" and the final answer goes in `<answer></answer>`.
- `plain`: GSM8K few-shot-free "Let's think step by step" style; the answer follows `####`.
- `chat`: the tokenizer's own chat template (instruct models), answer in `<answer></answer>`.

Add a template with `register_template(Template(...))`.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def check_chat_template(name: str, tokenizer: Any) -> None:
    """UserError naming the model when template `name` needs a chat template `tokenizer` lacks.

    Commands call it right after loading the tokenizer, so the mistake stops them before they
    write anything (a run directory, a progress bar); `render` checks again for other callers.
    """
    if not get_template(name).chat or getattr(tokenizer, "chat_template", None):
        return
    source = getattr(tokenizer, "name_or_path", "") or "the model"
    plain = ", ".join(n for n in template_names() if not _TEMPLATES[n].chat)
    raise UserError(
        f"template {name!r} uses the tokenizer's chat template, and {source} has no chat "
        f"template (a base model?); use --template with one of: {plain}"
    )


def render(name: str, task: Task, example: Example, tokenizer: Any = None) -> str:
    """The prompt text for `example` of `task` under template `name`."""
    template = get_template(name)
    body = template.text.format(question=task.question(example))
    if not template.chat:
        return body
    check_chat_template(name, tokenizer)
    messages = [{"role": "user", "content": body}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + template.assistant_prefix


def encode_prompts(
    tokenizer: Any, task: Task, examples: Sequence[Example], template: str | None = None
) -> list[list[int]]:
    """Prompt token ids of `examples`: the one encoding training and evaluation both use.

    A chat template's text already holds its special tokens (e.g. BOS), so none are added then;
    any other template gets the tokenizer's own special tokens (e.g. BOS), as the model saw in
    pretraining. `template` None means the task's default.
    """
    name = template or task.default_template
    texts = [task.prompt(ex, name, tokenizer) for ex in examples]
    return encode_texts(tokenizer, texts, name)


def encode_texts(tokenizer: Any, texts: Sequence[str], template: str) -> list[list[int]]:
    """Token ids of already rendered prompt `texts` of `template` (see `encode_prompts`)."""
    add_special = not get_template(template).chat
    return [list(tokenizer(t, add_special_tokens=add_special)["input_ids"]) for t in texts]
