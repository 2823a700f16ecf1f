"""Named chat templates (jinja) that a config can ask for with `chat_template: NAME`."""

from __future__ import annotations

from pathlib import Path

from newtune.errors import ConfigError
from newtune.vision_templates import VISION_TEMPLATES

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

QWEN = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{% endif %}" + CHATML
)

MISTRAL = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI_3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "qwen": QWEN,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi_3": PHI_3,
    **VISION_TEMPLATES,
}
TOKENIZER_DEFAULT = "tokenizer_default"


def resolve_chat_template(name_or_jinja: str | None, tokenizer_template: str | None) -> str | None:
    """The jinja source for a config's `chat_template` (a name, a jinja string, or None)."""
    if name_or_jinja is None or name_or_jinja == TOKENIZER_DEFAULT:
        return tokenizer_template
    if name_or_jinja in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_jinja]
    if "{%" in name_or_jinja or "{{" in name_or_jinja:
        return name_or_jinja
    if name_or_jinja.endswith((".jinja", ".j2")):
        path = Path(name_or_jinja).expanduser()
        if not path.is_file():
            raise ConfigError(f"chat template file {name_or_jinja} does not exist.")
        return path.read_text(encoding="utf-8")
    raise ConfigError(
        f"`chat_template: {name_or_jinja}` is not a template newtune knows. Use one of "
        f"{', '.join([TOKENIZER_DEFAULT, *NAMED_TEMPLATES])}, a jinja template string, or the "
        "path of a .jinja file."
    )


# Tests that give the same answer for a content string with or without marker characters.
_MARKER_BLIND_TESTS = {"string", "defined", "undefined", "none", "sequence", "iterable", "mapping"}


def content_only_printed(template: str) -> bool:
    """True when the template uses message contents only by printing them (maybe `+`-joined).

    Then wrapping every content in marker characters cannot change what the template does,
    and one marked render gives both the text and the content spans. Anything else done
    with a content (a filter such as `trim`, a comparison, `set`, a method call) returns
    False, and the engine checks the marked render against a plain one.
    """
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return False
    parents: dict[int, nodes.Node] = {}

    def walk(node: nodes.Node) -> bool:
        for child in node.iter_child_nodes():
            parents[id(child)] = node
            if _is_content(child) and not _printed(child, parents):
                return False
            if not walk(child):
                return False
        return True

    return walk(ast)


def _is_content(node: object) -> bool:
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and node.arg.value == "content"
    )


def _printed(node: object, parents: dict) -> bool:
    """The content node flows only through `+`/`~` into `{{ }}`, or is tested blind to markers."""
    from jinja2 import nodes

    child, parent = node, parents.get(id(node))
    if isinstance(parent, nodes.If) and parent.test is child:
        return True  # truthiness: markers are added to non-empty contents only
    if isinstance(parent, nodes.Test) and parent.name in _MARKER_BLIND_TESTS:
        return True
    while isinstance(parent, (nodes.Add, nodes.Concat)):
        child, parent = parent, parents.get(id(parent))
    return isinstance(parent, nodes.Output)
