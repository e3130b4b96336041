"""Generate with a DeepSeek-V4 model (+ a LoRA adapter) and parse the answer: reasoning, content and tool calls.

    python recipes/generate_dsv4.py --model_name_or_path BASE [--adapter ADAPTER_DIR] \
        (--prompt "text" | --messages messages.json) [--tools tools.json] [--thinking_mode thinking|chat] \
        [--reasoning_effort max] [--max_new_tokens 512] [--strict true]

The conversation is rendered by hf_dsv4's chat template (the checkpoint's effort profile unless `--effort_profile` is
given), the model generates, and the completion is parsed by `hf_dsv4.template.parse_completion` (lenient by default:
what does not parse stays in the content). Printed: the parsed assistant message as JSON, tool calls included
(`--show_text` prints the raw completion first). `--messages` / `--tools` take a JSON file or an inline JSON string.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_dsv4.template import detect_effort_profile, install_chat_template, parse_completion

logger = logging.getLogger("generate_dsv4")


@dataclass
class GenerateArguments:
    model_name_or_path: str = field(metadata={"help": "The base model (hub id or folder), or a merged model."})
    adapter: str | None = field(default=None, metadata={"help": "A PEFT adapter folder to apply on the base."})
    prompt: str | None = field(default=None, metadata={"help": "One user message (instead of --messages)."})
    messages: str | None = field(default=None, metadata={"help": "OpenAI-style messages: a JSON file or string."})
    tools: str | None = field(default=None, metadata={"help": "OpenAI tool definitions: a JSON file or string."})
    thinking_mode: str = field(default="thinking", metadata={"help": "'thinking' or 'chat'."})
    reasoning_effort: str | None = field(default=None, metadata={"help": "Reasoning effort (see --effort_profile)."})
    effort_profile: str = field(default="auto", metadata={"help": "'auto' (from the checkpoint), '0424' or '0731'."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens to generate at most."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling)."})
    dtype: str = field(default="bfloat16", metadata={"help": "Weights' dtype: bfloat16 or float32."})
    strict: bool = field(default=False, metadata={"help": "Raise on output that breaks the DSML grammar."})
    show_text: bool = field(default=False, metadata={"help": "Print the raw completion before the parsed message."})


def _json_argument(value: str | None, what: str):
    """A JSON file's content or an inline JSON string; None stays None."""
    if value is None:
        return None
    path = Path(value)
    text = path.read_text(encoding="utf-8") if path.is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--{what} is neither a JSON file nor a JSON string: {exc}") from exc


def generate(args: GenerateArguments) -> tuple[str, dict]:
    """(raw completion, parsed assistant message)."""
    messages = _json_argument(args.messages, "messages")
    if (messages is None) == (args.prompt is None):
        raise ValueError("give exactly one of --prompt and --messages")
    if messages is None:
        messages = [{"role": "user", "content": args.prompt}]
    tools = _json_argument(args.tools, "tools")
    profile = args.effort_profile
    if profile == "auto":
        profile = detect_effort_profile(args.model_name_or_path)
    tokenizer_source = args.adapter if args.adapter and (Path(args.adapter) / "tokenizer.json").is_file() else None
    tokenizer = install_chat_template(
        AutoTokenizer.from_pretrained(tokenizer_source or args.model_name_or_path), profile
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, thinking_mode=args.thinking_mode, reasoning_effort=args.reasoning_effort,
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )["input_ids"]  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature if args.do_sample else None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )  # fmt: skip
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
    return text, parse_completion(text, args.thinking_mode, tools=tools, strict=args.strict)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(argv)
    text, message = generate(args)
    if args.show_text:
        print(text)
    print(json.dumps(message, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
