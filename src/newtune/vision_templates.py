"""Named chat templates of vision-language families, for contents that are text or parts.

A content is a string or a list of parts (`{type: text, text}`, `{type: image}`); each
template prints text parts as they are and an image part as its family's placeholder, which
the processor expands into image tokens. Every template also renders plain string contents,
so the same template serves text-only rows.
"""

from __future__ import annotations


def _content(image: str) -> str:
    """Jinja that prints `message['content']` with image parts as `image`."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + image + "{% elif "
        "part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


QWEN2_VL = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    + _content("<|vision_start|><|image_pad|><|vision_end|>")
    + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA 1.5 (llava-hf): `USER: <image>\n... ASSISTANT: ...</s>`, a system text first.
LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + _content("<image>\n") + "\n"
    "{% elif message['role'] == 'user' %}USER: " + _content("<image>\n") + " "
    "{% else %}ASSISTANT: " + _content("<image>\n") + "{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Gemma 3: a system text opens the first user turn; images are `<start_of_image>`.
GEMMA3 = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = 1 %}"
    "<start_of_turn>user\n" + _content("<start_of_image>") + "\n\n"
    "{% else %}{% if not (ns.system and loop.index0 == 1 and message['role'] == 'user') %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% endif %}" + _content("<start_of_image>") + "<end_of_turn>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Idefics3 / SmolVLM: `User:<image>text<end_of_utterance>\nAssistant: text<end_of_utterance>`.
IDEFICS3 = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string or message['content'][0]['type'] != 'image' %}: "
    "{% else %}:{% endif %}" + _content("<image>") + "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

LLAMA3_2_VISION = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    + _content("<|image|>")
    + "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

VISION_TEMPLATES: dict[str, str] = {
    "qwen2_vl": QWEN2_VL,
    "llava": LLAVA,
    "gemma3": GEMMA3,
    "idefics3": IDEFICS3,
    "smolvlm": IDEFICS3,
    "llama3_2_vision": LLAMA3_2_VISION,
}
