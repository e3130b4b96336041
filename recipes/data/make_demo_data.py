"""Write `dsv4_demo.jsonl`, the small demo SFT dataset shipped with the recipes (deterministic, stdlib only).

    python recipes/data/make_demo_data.py [--output PATH]

Each line is `{"messages": [...], "tools": <JSON string or null>}` in TRL's conversational format with
DeepSeek-V4 message fields (`reasoning_content`, `tool_calls` with JSON-string `arguments`, `tool_call_id`):

- reasoning: one question (arithmetic, logic, units), an answer with `reasoning_content`;
- multi-turn: 2-3 user turns, some with `reasoning_content` on the last assistant turn;
- tool calling: `tools` is `json.dumps` of OpenAI function tools; the assistant reasons, calls one or two tools
  (parallel or in sequence), reads the `tool` results and answers;
- ReAct: tools described in the system text, `Thought:`/`Action:`/`Action Input:` assistant texts, `Observation:`
  user messages and a `Final Answer:`; `hf_dsv4.template.react_to_messages` turns them into native messages.

The rows are interleaved round-robin over the four kinds, so any prefix of the file mixes them. Rerunning writes
the same bytes. `--long` writes `dsv4_demo_long.jsonl` instead: 8 agent traces of 21 tool rounds each (7.9-8k tokens
of the tiny tokenizer), for long-context runs (`recipes/configs/tiny_cpu_long.yaml`).
"""

from __future__ import annotations

import argparse
import json
from itertools import zip_longest
from pathlib import Path

OUTPUT = Path(__file__).with_name("dsv4_demo.jsonl")
LONG_OUTPUT = Path(__file__).with_name("dsv4_demo_long.jsonl")


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(content: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def row(messages: list[dict], tools: list[dict] | None = None) -> dict:
    return {"messages": messages, "tools": dumps(tools) if tools else None}


# ------------------------------------------------------------------------------------------------------------
# Reasoning: question, (reasoning, answer)
# ------------------------------------------------------------------------------------------------------------

REASONING = [
    ("What is 17 * 23?", "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391.", "17 * 23 = 391."),
    ("Convert 25 °C to Fahrenheit.", "F = C * 9/5 + 32 = 25 * 9/5 + 32 = 45 + 32 = 77.", "25 °C is 77 °F."),
    (
        "How many miles is 5 km?",
        "1 km is about 0.621 miles, so 5 km is 5 * 0.621 = 3.105 miles.",
        "5 km is about 3.11 miles.",
    ),
    ("What is 144 divided by 12?", "12 * 12 = 144, so 144 / 12 = 12.", "144 / 12 = 12."),
    (
        "A train covers 180 km in 2.5 hours. What is its average speed?",
        "Speed is distance over time: 180 / 2.5 = 72.",
        "Its average speed is 72 km/h.",
    ),
    (
        "All bloops are razzies and all razzies are lazzies. Are all bloops lazzies?",
        "Every bloop is a razzie, and every razzie is a lazzie, so every bloop is a lazzie.",
        "Yes, all bloops are lazzies.",
    ),
    (
        "Tom is older than Ann, and Ann is older than Ben. Who is the youngest?",
        "Tom > Ann and Ann > Ben, so Tom > Ann > Ben. Ben is the youngest.",
        "Ben is the youngest.",
    ),
    ("What is 15% of 80?", "15% of 80 = 0.15 * 80 = 12.", "15% of 80 is 12."),
    (
        "How many minutes are in 3 hours and 45 minutes?",
        "3 hours = 3 * 60 = 180 minutes, plus 45 gives 225.",
        "3 hours and 45 minutes is 225 minutes.",
    ),
    ("How many grams are in 2.5 kg?", "1 kg = 1000 g, so 2.5 kg = 2.5 * 1000 = 2500 g.", "2.5 kg is 2500 g."),
    (
        "What is the sum of the whole numbers from 1 to 10?",
        "The sum 1 + ... + n is n(n + 1)/2. With n = 10: 10 * 11 / 2 = 55.",
        "The sum is 55.",
    ),
    (
        "Convert 98.6 °F to Celsius.",
        "C = (F - 32) * 5/9 = (98.6 - 32) * 5/9 = 66.6 * 5/9 = 37.",
        "98.6 °F is 37 °C.",
    ),
    ("Is 91 a prime number?", "Try small primes: 91 / 7 = 13, so 91 = 7 * 13.", "No, 91 = 7 * 13 is not prime."),
    (
        "How tall is 6 feet in metres?",
        "1 foot = 0.3048 m, so 6 feet = 6 * 0.3048 = 1.8288 m.",
        "6 feet is about 1.83 m.",
    ),
    (
        "A jacket in Zürich costs 120 CHF and is 25% off. What is the sale price?",
        "25% of 120 is 30. 120 - 30 = 90.",
        "The sale price is 90 CHF.",
    ),
    (
        "What comes next: 2, 4, 8, 16, ...?",
        "Each number doubles the one before it: 16 * 2 = 32.",
        "The next number is 32.",
    ),
]


def reasoning_rows() -> list[dict]:
    rows = []
    for k, (question, reasoning, answer) in enumerate(REASONING):
        prefix = [system("You are a careful assistant. Think step by step.")] if k % 4 == 0 else []
        rows.append(row([*prefix, user(question), assistant(answer, reasoning)]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Multi-turn chats: (user, answer) turns; a third element is the reasoning of that (last) turn
# ------------------------------------------------------------------------------------------------------------

CHATS = [
    [
        ("I'm visiting Zürich in March. What should I pack?", "Pack warm layers, a rain jacket and good shoes."),
        ("Will it snow?", "Snow is possible in early March, but most days are cool and dry, around 5 to 10 °C."),
    ],
    [
        ("How do I reverse a list in Python?", "Use `items.reverse()` to reverse in place, or `items[::-1]`."),
        (
            "Which one makes a copy?",
            "`items[::-1]` returns a new list; `items.reverse()` changes the list and returns None.",
            "reverse() works in place and returns None. Slicing always builds a new list.",
        ),
    ],
    [
        ("How long should I boil an egg?", "About 9 to 12 minutes for a hard-boiled egg."),
        ("And for a soft yolk?", "About 6 minutes, then cool it in cold water."),
    ],
    [
        ("Suggest a name for a grey cat.", "How about Smokey, Ash or Pebble?"),
        ("Something shorter?", "Try Ash or Pip."),
        ("Thanks, Pip it is!", "Great choice. Say hi to Pip!"),
    ],
    [
        ("What is 12 squared?", "12 squared is 144."),
        ("And 13 squared?", "13 squared is 169.", "13 * 13 = 13 * 10 + 13 * 3 = 130 + 39 = 169."),
    ],
    [
        ("How do you say 'good morning' in German?", "Guten Morgen."),
        ("And in French?", "Bonjour."),
        ("And in Italian?", "Buongiorno."),
    ],
    [
        ("It's 30 °C today. Is that hot?", "Yes, 30 °C is a hot summer day for most people."),
        ("What is that in Fahrenheit?", "30 °C is 86 °F.", "F = 30 * 9/5 + 32 = 54 + 32 = 86."),
    ],
    [
        ("Any tips for studying for an exam?", "Study in short sessions, test yourself, and sleep well."),
        ("How short is short?", "About 25 to 50 minutes, with a 5 to 10 minute break."),
    ],
    [
        ("Can you recommend a classic science fiction book?", "Try 'The Left Hand of Darkness' by Ursula K. Le Guin."),
        ("Something lighter?", "'The Hitchhiker's Guide to the Galaxy' by Douglas Adams is light and funny."),
    ],
    [
        ("In winter, if it is 9:00 in London, what time is it in Zürich?", "It is 10:00 in Zürich."),
        (
            "And in New York?",
            "It is 4:00 in New York.",
            "In winter London is UTC+0 and New York is UTC-5, so 9:00 - 5 hours = 4:00.",
        ),
    ],
    [
        ("How many millilitres are in a US cup?", "A US cup is about 240 ml."),
        (
            "How many cups are in a litre, then?",
            "A litre is about 4.2 US cups.",
            "1 litre = 1000 ml, and 1000 / 240 = 4.17, so about 4.2 cups.",
        ),
    ],
    [
        ("Hi!", "Hello! How can I help you today?"),
        ("What is the capital of Switzerland?", "The capital of Switzerland is Bern."),
        ("Not Zürich?", "No. Zürich is the largest city, but the federal government sits in Bern."),
    ],
]


def chat_rows() -> list[dict]:
    rows = []
    for k, turns in enumerate(CHATS):
        messages = [system("You are a friendly assistant.")] if k % 3 == 0 else []
        for question, answer, *reasoning in turns:
            messages += [user(question), assistant(answer, *reasoning)]
        rows.append(row(messages))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Tool calling: OpenAI function tools, native tool_calls and tool results
# ------------------------------------------------------------------------------------------------------------


def function_tool(name: str, description: str, properties: dict) -> dict:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER = function_tool(
    "get_weather", "Get the current weather in a city.", {"city": {"type": "string", "description": "City name"}}
)
CURRENCY = function_tool(
    "convert_currency",
    "Convert an amount of money between currencies.",
    {
        "amount": {"type": "number"},
        "from": {"type": "string", "description": "ISO code, e.g. EUR"},
        "to": {"type": "string", "description": "ISO code, e.g. CHF"},
    },
)
BOOKS = function_tool(
    "search_books",
    "Search a library catalogue for books.",
    {"query": {"type": "string"}, "max_results": {"type": "integer"}},
)


def weather(city: str, temperature: int, condition: str) -> tuple[str, dict, dict]:
    """A get_weather call and its result."""
    return "get_weather", {"city": city}, {"city": city, "temp_c": temperature, "condition": condition}


def currency(amount: float, source: str, target: str, rate: float) -> tuple[str, dict, dict]:
    """A convert_currency call and its result at exchange `rate` (rounded to cents)."""
    arguments = {"amount": amount, "from": source, "to": target}
    return "convert_currency", arguments, {"amount": round(amount * rate, 2), "currency": target}


def books(query: str, max_results: int, found: list[tuple[str, str, int]]) -> tuple[str, dict, dict]:
    """A search_books call and its result: (title, author, year) per book."""
    results = [{"title": title, "author": author, "year": year} for title, author, year in found]
    return "search_books", {"query": query, "max_results": max_results}, {"results": results}


def tool_round(first_id: int, reasoning: str, calls: list[tuple[str, dict, dict]]) -> list[dict]:
    """An assistant message making `calls` (ids call_{first_id}, ...) and one tool message per result."""
    tool_calls = [
        {"id": f"call_{first_id + k}", "type": "function", "function": {"name": name, "arguments": dumps(arguments)}}
        for k, (name, arguments, _) in enumerate(calls)
    ]
    results = [
        {"role": "tool", "tool_call_id": f"call_{first_id + k}", "content": dumps(result)}
        for k, (_, _, result) in enumerate(calls)
    ]
    return [{"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": tool_calls}, *results]


# (question, [(reasoning, calls) per round], final answer)
TOOL_CONVERSATIONS = [
    (
        "What's the weather like in Zürich right now?",
        [("The user wants the current weather in Zürich.", [weather("Zürich", 18, "cloudy")])],
        "It is 18 °C and cloudy in Zürich.",
    ),
    (
        "Compare the weather in Paris and Berlin.",
        [("I need the weather in two cities; I can ask for both at once.", [weather("Paris", 22, "sunny"), weather("Berlin", 16, "rainy")])],
        "Paris is sunny at 22 °C, while Berlin is rainy at 16 °C, so Paris is warmer and drier.",
    ),
    (
        "How much is 100 USD in EUR?",
        [("Convert 100 from USD to EUR.", [currency(100, "USD", "EUR", 0.92)])],
        "100 USD is about 92.00 EUR.",
    ),
    (
        "I have 250 CHF. How much is that in EUR and in USD?",
        [("Two conversions, in parallel.", [currency(250, "CHF", "EUR", 1.05), currency(250, "CHF", "USD", 1.13)])],
        "250 CHF is about 262.50 EUR or 282.50 USD.",
    ),
    (
        "Find me up to 3 books about Dune.",
        [("Search the catalogue for Dune, at most 3 results.", [books("Dune", 3, [("Dune", "Frank Herbert", 1965), ("Dune Messiah", "Frank Herbert", 1969)])])],
        "I found 'Dune' (1965) and 'Dune Messiah' (1969), both by Frank Herbert.",
    ),
    (
        "Suggest two Python books for beginners.",
        [("Search for beginner Python books, 2 results.", [books("Python for beginners", 2, [("Automate the Boring Stuff with Python", "Al Sweigart", 2015), ("Python Crash Course", "Eric Matthes", 2015)])])],
        "Try 'Automate the Boring Stuff with Python' by Al Sweigart or 'Python Crash Course' by Eric Matthes.",
    ),
    (
        "Is it cold in Tokyo today?",
        [("Check the weather in Tokyo.", [weather("Tokyo", 9, "clear")])],
        "It is 9 °C and clear in Tokyo, so it is chilly: take a coat.",
    ),
    (
        "What's the weather in São Paulo?",
        [("Look up São Paulo.", [weather("São Paulo", 27, "humid")])],
        "It is 27 °C and humid in São Paulo.",
    ),
    (
        "Convert 50 GBP to EUR, please.",
        [("Convert 50 from GBP to EUR.", [currency(50, "GBP", "EUR", 1.17)])],
        "50 GBP is about 58.50 EUR.",
    ),
    (
        "Which books by Ursula K. Le Guin do you have? Two are enough.",
        [("Search by author, 2 results.", [books("Ursula K. Le Guin", 2, [("A Wizard of Earthsea", "Ursula K. Le Guin", 1968), ("The Dispossessed", "Ursula K. Le Guin", 1974)])])],
        "We have 'A Wizard of Earthsea' (1968) and 'The Dispossessed' (1974).",
    ),
    (
        "Is it warmer in Oslo or in Reykjavík?",
        [("Get both cities' weather in parallel.", [weather("Oslo", 4, "snow"), weather("Reykjavík", 2, "windy")])],
        "Oslo is slightly warmer: 4 °C with snow, against 2 °C and windy in Reykjavík.",
    ),
    (
        "How many US dollars is 1200 JPY?",
        [("Convert 1200 JPY to USD.", [currency(1200, "JPY", "USD", 0.0067)])],
        "1200 JPY is about 8.04 USD.",
    ),
    (
        "I'm in Zürich tomorrow with 200 EUR. What's the weather, and how many francs is that?",
        [("Two independent questions: the weather in Zürich and 200 EUR in CHF.", [weather("Zürich", 14, "sunny"), currency(200, "EUR", "CHF", 0.95)])],
        "Zürich is sunny at 14 °C, and 200 EUR is about 190.00 CHF.",
    ),
    (
        "Find a Jules Verne novel and its price in CHF.",
        [
            ("Find a novel first.", [("search_books", {"query": "Jules Verne", "max_results": 1}, {"results": [{"title": "The Mysterious Island", "price_eur": 12}]})]),
            ("Convert its 12 EUR.", [currency(12, "EUR", "CHF", 0.95)]),
        ],
        "'The Mysterious Island' costs about 11.40 CHF.",
    ),
]  # fmt: skip


def tool_rows() -> list[dict]:
    rows = []
    for k, (question, rounds, answer) in enumerate(TOOL_CONVERSATIONS):
        messages = [system("You are a helpful assistant with tools.")] if k % 2 == 0 else []
        messages.append(user(question))
        for reasoning, calls in rounds:
            calls_so_far = sum(m["role"] == "tool" for m in messages)
            messages += tool_round(calls_so_far, reasoning, calls)
        messages.append(assistant(answer))
        rows.append(row(messages, [WEATHER, CURRENCY, BOOKS]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# ReAct: tools described in text; Thought/Action/Action Input, Observation, Final Answer
# ------------------------------------------------------------------------------------------------------------

REACT_SYSTEM = (
    "Tools: get_weather(city), convert_currency(amount, from, to), search_books(query, max_results).\n"
    "Reply in Thought, Action, Action Input (JSON) and Final Answer lines; tools reply with an Observation."
)


def react_step(thought: str, calls: list[tuple[str, dict, dict]]) -> list[dict]:
    """An assistant ReAct step making `calls` and the user message holding one Observation per call."""
    actions = "".join(f"\nAction: {name}\nAction Input: {dumps(arguments)}" for name, arguments, _ in calls)
    observations = "\n".join(f"Observation: {dumps(result)}" for _, _, result in calls)
    return [assistant(f"Thought: {thought}{actions}"), user(observations)]


# (question, [(thought, calls) per step], final thought, final answer)
REACT_CONVERSATIONS = [
    (
        "What is the weather in Paris?",
        [("I should look up the weather in Paris.", [weather("Paris", 21, "sunny")])],
        "I have the weather in Paris.",
        "It is 21 °C and sunny in Paris.",
    ),
    (
        "How much is 80 USD in CHF?",
        [("I need to convert 80 USD to CHF.", [currency(80, "USD", "CHF", 0.88)])],
        "The conversion is done.",
        "80 USD is about 70.40 CHF.",
    ),
    (
        "Find me a book about astronomy.",
        [("I should search the library.", [books("astronomy", 1, [("Cosmos", "Carl Sagan", 1980)])])],
        "I found one.",
        "Try 'Cosmos' by Carl Sagan (1980).",
    ),
    (
        "Is it warmer in Rome or Zürich?",
        [
            ("First, Rome.", [weather("Rome", 24, "sunny")]),
            ("Now Zürich.", [weather("Zürich", 15, "cloudy")]),
        ],
        "Rome is warmer.",
        "Rome is warmer (24 °C vs 15 °C).",
    ),
    (
        "What is the weather in Oslo and in Bergen?",
        [("I can look up both cities at once.", [weather("Oslo", 3, "snow"), weather("Bergen", 7, "rain")])],
        "I have both cities.",
        "Oslo has snow at 3 °C; Bergen has rain at 7 °C.",
    ),
    (
        "How much is 45 EUR in GBP?",
        [("I need to convert 45 EUR to GBP.", [currency(45, "EUR", "GBP", 0.85)])],
        "45 * 0.85 = 38.25.",
        "45 EUR is about 38.25 GBP.",
    ),
]  # fmt: skip


def react_rows() -> list[dict]:
    rows = []
    for question, steps, thought, answer in REACT_CONVERSATIONS:
        messages = [system(REACT_SYSTEM), user(question)]
        for step_thought, calls in steps:
            messages += react_step(step_thought, calls)
        messages.append(assistant(f"Thought: {thought}\nFinal Answer: {answer}"))
        rows.append(row(messages))
    return rows


def demo_rows() -> list[dict]:
    """All rows, interleaved round-robin over the four kinds."""
    kinds = [reasoning_rows(), chat_rows(), tool_rows(), react_rows()]
    return [r for group in zip_longest(*kinds) for r in group if r is not None]


# ------------------------------------------------------------------------------------------------------------
# Long agent traces (`--long`): one task worked through in many tool rounds, ~7-8k tokens of the tiny tokenizer
# ------------------------------------------------------------------------------------------------------------

CITIES = ["Zürich", "Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul", "Delhi", "Rome"]
CONDITIONS = ["sunny", "cloudy", "rainy", "clear", "windy", "foggy"]
CURRENCIES = [("USD", 1.0), ("EUR", 0.92), ("GBP", 0.79), ("CHF", 0.88), ("JPY", 151.0), ("CAD", 1.36)]


def long_agent_row(seed: int, rounds: int) -> dict:
    """A travel-planning trace: `rounds` tool rounds (weather of a city, then a currency conversion for it), each
    with its reasoning, then a summary answer. Deterministic in `seed`."""
    messages = [system("You are a meticulous travel assistant. Check every leg before answering."),
                user(f"Plan trip {seed}: for each of {rounds} stops, check the weather and convert my budget.")]  # fmt: skip
    summary = []
    for step in range(rounds):
        city = CITIES[(seed + step) % len(CITIES)]
        code, rate = CURRENCIES[(seed * 3 + step) % len(CURRENCIES)]
        temperature = (seed * 7 + step * 5) % 35 - 5
        condition = CONDITIONS[(seed + step * 2) % len(CONDITIONS)]
        amount = 100 + 25 * ((seed + step) % 9)
        reasoning = f"Stop {step + 1} of {rounds} is {city}. First its weather, then {amount} USD in {code}."
        messages += tool_round(2 * step, reasoning, [weather(city, temperature, condition)])
        messages += tool_round(
            2 * step + 1, f"{city} is {condition}; now the budget.", [currency(amount, "USD", code, rate)]
        )
        summary.append(f"{city}: {temperature} °C, {condition}, {round(amount * rate, 2)} {code}")
    messages.append(assistant("Here is the plan. " + "; ".join(summary) + ".", "All stops are checked; summarize."))
    return row(messages, [WEATHER, CURRENCY])


def long_rows(count: int = 8, rounds: int = 21) -> list[dict]:
    return [long_agent_row(seed, rounds) for seed in range(count)]


def write(path: Path, long: bool = False) -> int:
    rows = long_rows() if long else demo_rows()
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help=f"where to write (default: {OUTPUT.name}, or "
                        f"{LONG_OUTPUT.name} with --long)")  # fmt: skip
    parser.add_argument("--long", action="store_true", help="long agent traces (~8k tokens each) instead")
    args = parser.parse_args()
    output = args.output or (LONG_OUTPUT if args.long else OUTPUT)
    print(f"wrote {write(output, args.long)} conversations to {output}")


if __name__ == "__main__":
    main()
