"""Named chat templates (jinja) that a config can ask for with `chat_template: NAME`."""

from __future__ import annotations

from newtune.errors import ConfigError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3}
TOKENIZER_DEFAULT = "tokenizer_default"


def resolve_chat_template(name_or_jinja: str | None, tokenizer_template: str | None) -> str | None:
    """The jinja source for a config's `chat_template` (a name, a jinja string, or None)."""
    if name_or_jinja is None or name_or_jinja == TOKENIZER_DEFAULT:
        return tokenizer_template
    if name_or_jinja in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_jinja]
    if "{%" in name_or_jinja or "{{" in name_or_jinja:
        return name_or_jinja
    raise ConfigError(
        f"`chat_template: {name_or_jinja}` is not a template newtune knows. Use one of "
        f"{', '.join([TOKENIZER_DEFAULT, *NAMED_TEMPLATES])}, or a jinja template string."
    )
