"""A short tour of the DeepSeek-V4 chat format on the built-in tiny tokenizer (no download).

    python -m hf_dsv4.demo

Renders a tool-calling conversation with the Python encoder and with the tokenizer's Jinja chat template (and
checks they agree byte for byte), tokenizes it with assistant-only labels, shows what is trained, and parses a
model completion back into an OpenAI-style message.
"""

from __future__ import annotations

import json

from .template import attach_tools, encode_messages, install_chat_template, parse_completion, tokenize_conversation
from .testing import tiny_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "I should call get_weather.",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "reasoning_content": "Report it.", "content": "It is 21 °C and clear in Paris."},
]


def _rule(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def main() -> None:
    tok = install_chat_template(tiny_tokenizer())

    text = encode_messages(attach_tools(CONVERSATION, TOOLS))
    jinja_text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    _rule("prompt text (encode_messages == apply_chat_template: %s)" % (text == jinja_text))
    print(text)
    if text != jinja_text:
        raise SystemExit("the Jinja template and the encoder disagree")

    sample = tokenize_conversation(tok, CONVERSATION, TOOLS)
    trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    _rule(f"tokenized: {len(sample['input_ids'])} tokens, {len(trained)} trained (assistant spans)")
    runs, run = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    for k, r in enumerate(runs):
        print(f"--- trained span {k}: {tok.decode(r)!r}")

    completion = text[text.index("<｜Assistant｜><think>") + len("<｜Assistant｜><think>") :].split("<｜User｜>")[0]
    _rule("parse_completion of the first assistant turn")
    print(json.dumps(parse_completion(completion, tools=TOOLS), ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
