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

# -- vendor templates of Axolotl's `chat_template` names ------------------------------------
# Written from each vendor's published format (the model's tokenizer_config.json template):
# the same text for system/user/assistant turns, the generation prompt and BOS/EOS. Where a
# vendor template edits or inspects a content (strip, split, startswith) newtune prints it
# as it is, so label masks stay exact; each comment names what differs from the vendor.


def _parts(image: str, audio: str = "", trim: bool = False) -> str:
    """Jinja that prints `message['content']`: a string, or text/image/audio parts."""
    cut = " | trim" if trim else ""
    return (
        "{% if message['content'] is string %}{{ message['content']" + cut + " }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + image + "{% elif "
        "part['type'] == 'audio' %}" + audio + "{% elif part['type'] == 'text' %}"
        "{{ part['text']" + cut + " }}{% endif %}{% endfor %}{% endif %}"
    )


_QWEN_TOOLS_HEAD = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n'
)


def _qwen_system(default: str) -> str:
    """Qwen's first system turn: the tool definitions after the system text when tools are
    given; `default` when the conversation has no system message ('' for none)."""
    fallback = "{{ '" + default + "' }}" if default else ""
    return (
        "{% if tools %}{{ '<|im_start|>system\\n' }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] }}{{ '\\n\\n' }}"
        + ("{% else %}" + fallback + "{{ '\\n\\n' }}" if default else "")
        + "{% endif %}{{ '"
        + _QWEN_TOOLS_HEAD
        + "' }}"
        "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
        "{{ '" + _QWEN_TOOLS_TAIL + "' }}"
        "{% elif messages and messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        + (
            "{% else %}{{ '<|im_start|>system\\n' }}" + fallback + "{{ '<|im_end|>\\n' }}"
            if default
            else ""
        )
        + "{% endif %}"
    )


def _qwen_tool_calls(newline_always: bool) -> str:
    """An assistant's `tool_calls` (OpenAI style) as Qwen's <tool_call> JSON blocks; Qwen2.5
    opens each with a newline, Qwen3 all but a first one that follows no content."""
    newline = (
        "{{ '\\n' }}"
        if newline_always
        else "{% if not loop.first %}{{ '\\n' }}{% elif message['content'] %}{{ '\\n' }}{% endif %}"
    )
    return (
        "{% for call in message['tool_calls'] or [] %}"
        "{% set call = call['function'] if call['function'] is defined else call %}"
        + newline
        + "{{ '<tool_call>\\n{\"name\": \"' }}{{ call['name'] }}{{ '\", \"arguments\": ' }}"
        "{% if call['arguments'] is string %}{{ call['arguments'] }}"
        "{% else %}{{ call['arguments'] | tojson }}{% endif %}{{ '}\\n</tool_call>' }}"
        "{% endfor %}"
    )


# Consecutive `tool` messages share one user turn of <tool_response> blocks.
_QWEN_TOOL_RESPONSE = (
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ message['content'] }}{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
)

# Qwen2.5 (Qwen/Qwen2.5-*-Instruct): ChatML, Alibaba's default system text when the
# conversation has none, tool definitions in the system turn, <tool_call> JSON blocks.
QWEN_25 = (
    _qwen_system("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    + "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}" + _QWEN_TOOL_RESPONSE + "{% elif not (loop.first and "
    "message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message['role'] != 'assistant' or not message['tool_calls'] %}{{ '\\n' }}"
    "{% elif message['content'] %}{{ '\\n' }}{% endif %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}" + _qwen_tool_calls(True) + "{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _qwen3(content: str, generation_think: str) -> str:
    """Qwen3-style reasoning chat: the assistant turns after the last user message carry
    `<think>\\nTRACE\\n</think>\\n\\n` (an empty block on the final turn when it has no
    trace); earlier turns drop their trace, as the vendor renders history."""
    return (
        _qwen_system("") + "{% set ns = namespace(last_query=messages | length - 1) %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'tool' %}"
        + _QWEN_TOOL_RESPONSE
        + "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% set trace = message['reasoning_content'] %}"
        "{% if loop.index0 > ns.last_query and (loop.last or trace) %}"
        "{{ '<think>\\n' + (trace or '').strip('\\n') + '\\n</think>\\n\\n' }}{% endif %}"
        + content
        + _qwen_tool_calls(False)
        + "{{ '<|im_end|>\\n' }}"
        "{% elif not (loop.first and message['role'] == 'system') %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + content + "{{ '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\\n\\n</think>\\n\\n' }}{% else %}"
        + generation_think
        + "{% endif %}{% endif %}"
    )


# Qwen3 (Qwen/Qwen3-*): ChatML without a default system text; the reasoning trace comes from
# the message's `reasoning_content` (newtune's field_thinking / template_thinking_key).
# Differs from the vendor: a content is printed as it is, so a `<think>...</think>` written
# inside the content is not split out (put traces in `reasoning_content`), the answer's leading
# newlines are kept, and the last query is the last `user` message (the vendor also skips user
# messages that are `<tool_response>` wrappers). `enable_thinking=false` gives the empty block.
QWEN3 = _qwen3("{{ message['content'] }}", "")

# Qwen3.5 (Qwen/Qwen3.5-*): Qwen3's text format with image and video parts as
# `<|vision_start|><|image_pad|><|vision_end|>`; the generation prompt opens the think block
# (`<think>\\n`) unless enable_thinking is false. Tool calls are written in Qwen3's JSON form.
# Differences from the vendor: as QWEN3's.
QWEN3_5 = _qwen3(_parts("<|vision_start|><|image_pad|><|vision_end|>"), "{{ '<think>\\n' }}")

# Falcon-H1 (tiiuae/Falcon-H1-*-Instruct): BOS, then ChatML; the system text (and the tool
# definitions, whose system turn the vendor leaves unclosed) first; later system messages are
# dropped, as the vendor does.
FALCON_H1 = (
    "{{ bos_token }}{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You are a function calling AI model. You are provided with function signature "
    "within <tools> </tools> XML tags. You may call one or more functions to assist with the "
    "user query. Don\\'t make assumptions about what values to plug into functions.\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ '[' }}{{ tool | tojson }}{{ ']' }}{% endfor %}"
    "{{ '\\n</tools>\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call> </tool_call> tags with the following schema:\\n<tool_call>\\n"
    "{\\'arguments\\': <args-dict>, \\'name\\': <function-name>}\\n</tool_call>\\n' }}"
    "{% elif messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Command-R (CohereForAI/c4ai-command-r-*): turn tokens; user and assistant texts stripped,
# a system text first. Tool and RAG prompts (command_a_*) are not rendered; the vendor's
# alternation check is not made.
COHERE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if loop.first %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% elif message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}{{ message['content'] | trim }}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{{ message['content'] | trim }}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

# DeepSeek-V2.5 / V2-Chat-0628 (deepseek-ai): BOS, `<｜User｜>` and `<｜Assistant｜>` markers,
# the assistant's text ends with EOS, a system text is followed by a blank line. Tool calls
# are not rendered.
DEEPSEEK_V2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# Jamba 1.5 (ai21labs/AI21-Jamba-1.5-*): `<|startoftext|>`, a system turn always (empty when
# the conversation has none), each turn `<|bom|><|ROLE|> TEXT` closed by `<|eom|>`; the
# generation prompt is `<|bom|><|assistant|>`. Tool definitions, documents and citations are
# not rendered.
JAMBA = (
    "{{ '<|startoftext|><|bom|><|system|> ' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|eom|><|bom|><|' + message['role'] + '|> ' + message['content'] }}"
    "{% endif %}{% endfor %}{{ '<|eom|>' }}"
    "{% if add_generation_prompt %}{{ '<|bom|><|assistant|>' }}{% endif %}"
)

# Gemma 3n (google/gemma-3n-*): Gemma turns, the system text opens the first user turn,
# contents trimmed, images `<image_soft_token>` and audio `<audio_soft_token>` (the
# processor expands them). The vendor's alternation check is not made.
GEMMA3N = (
    "{{ bos_token }}{% set ns = namespace(system=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{% set ns.system = true %}"
    "{{ '<start_of_turn>user\\n' }}"
    + _parts("<image_soft_token>", "<audio_soft_token>")
    + "{{ '\\n\\n' }}{% else %}"
    "{% if not (ns.system and loop.index0 == 1 and message['role'] == 'user') %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\\n' }}{% endif %}"
    + _parts("<image_soft_token>", "<audio_soft_token>", trim=True)
    + "{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Gemma 4 (google/gemma-4-*): BOS, `<|turn>ROLE\\n...<turn|>\\n` turns (assistant is `model`),
# a system turn for a system text (and `<|think|>` when enable_thinking), contents trimmed,
# images `<|image|>` and audio `<|audio|>`; the generation prompt closes an empty thought
# channel unless enable_thinking. Differs from the vendor: a reasoning trace
# (`reasoning_content`) of an assistant turn after the last user message is rendered as
# `<|channel>thought\\nTRACE\\n<channel|>` (the vendor keeps it only beside tool calls), a
# thought channel written inside the content is not stripped, tool definitions and calls are
# not rendered and a `tool` message is a plain `tool` turn.
GEMMA4 = (
    "{{ bos_token }}{% set think = enable_thinking is defined and enable_thinking %}"
    "{% set system = messages and messages[0]['role'] in ['system', 'developer'] %}"
    "{% if think or system %}{{ '<|turn>system\\n' }}{% if think %}{{ '<|think|>\\n' }}{% endif %}"
    "{% endif %}"
    "{% set ns = namespace(last_user=-1) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}{% if loop.first and system %}"
    + _parts("<|image|>", "<|audio|>", trim=True)
    + "{{ '<turn|>\\n' }}{% else %}{% if loop.first and think %}{{ '<turn|>\\n' }}{% endif %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% set trace = message['reasoning_content'] %}"
    "{% if message['role'] == 'assistant' and trace and loop.index0 > ns.last_user %}"
    "{{ '<|channel>thought\\n' + trace + '\\n<channel|>' }}{% endif %}"
    + _parts("<|image|>", "<|audio|>", trim=True)
    + "{{ '<turn|>\\n' }}{% endif %}{% endfor %}"
    "{% if not messages and think %}{{ '<turn|>\\n' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}"
    "{% if not think %}{{ '<|channel>thought\\n<channel|>' }}{% endif %}{% endif %}"
)

# Pixtral (mistral-community/pixtral-12b): BOS, `[INST]USER[/INST]ASSISTANT</s>` without
# spaces, images `[IMG]`. The vendor puts the system text in front of the last message when
# that is a user message (so a conversation ending with an assistant turn loses it); newtune
# puts it in front of the last user message, the same text for a prompt and kept for training.
PIXTRAL = (
    "{{ bos_token }}{% set ns = namespace(last_user=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if loop.index0 == ns.last_user and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{{ '\\n\\n' }}{% endif %}"
    + _parts("[IMG]")
    + "{{ '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    + _parts("[IMG]")
    + "{{ eos_token }}{% endif %}{% endfor %}"
)

# Llama 4 (meta-llama/Llama-4-*): BOS, `<|header_start|>ROLE<|header_end|>\\n\\n...<|eot|>`
# turns, the system text trimmed, images `<|image|>`, `tool` messages as `ipython` turns.
# Tool definitions and calls (`<|python_start|>`) are not rendered.
LLAMA4 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if loop.first and message['role'] == 'system' %}"
    "{{ '<|header_start|>system<|header_end|>\\n\\n' }}"
    + _parts("<|image|>", trim=True)
    + "{% else %}{{ '<|header_start|>' + ('ipython' if message['role'] in ['tool', 'ipython'] "
    "else message['role']) + '<|header_end|>\\n\\n' }}"
    + _parts("<|image|>")
    + "{% endif %}{{ '<|eot|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{% endif %}"
)

VENDOR_TEMPLATES: dict[str, str] = {
    "llama4": LLAMA4,
    "qwen_25": QWEN_25,
    "qwen3": QWEN3,
    "qwen3_5": QWEN3_5,
    "falcon_h1": FALCON_H1,
    "cohere": COHERE,
    "deepseek_v2": DEEPSEEK_V2,
    "jamba": JAMBA,
    "gemma3n": GEMMA3N,
    "gemma4": GEMMA4,
    "gemma4_unified": GEMMA4,  # the same chat format as Gemma 4
    "pixtral": PIXTRAL,
}

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "qwen": QWEN,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi_3": PHI_3,
    **VISION_TEMPLATES,
    **VENDOR_TEMPLATES,
}
TOKENIZER_DEFAULT = "tokenizer_default"


def template_problem(value: str, key: str = "chat_template") -> str | None:
    """Why newtune cannot render `key: value` (one paragraph), or None when it can.

    A value is a name newtune has, `tokenizer_default`, a jinja string or a .jinja/.j2 path
    (whose existence is checked when the template is read).
    """
    if (
        value == TOKENIZER_DEFAULT
        or value in NAMED_TEMPLATES
        or "{%" in value
        or "{{" in value
        or value.endswith((".jinja", ".j2"))
    ):
        return None
    return (
        f"`{key}: {value}` is not a chat template newtune can render. The names newtune has "
        f"are {', '.join(NAMED_TEMPLATES)}. To use the model's own template write "
        f"`{key}: {TOKENIZER_DEFAULT}`; to give a template, write it as a jinja string in "
        f"`{key}` or `chat_template_jinja` (a dataset entry's key), or the path of a .jinja "
        "file."
    )


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
    raise ConfigError(template_problem(name_or_jinja) or name_or_jinja)


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
