"""recipes/generate_dsv4.py end to end on the tiny model: the conversation rendered by the chat template, generated
by base + adapter, the completion parsed (the text is noise; the pipeline and the parse are what is checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import import_recipe
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_dsv4.template import encode_messages, parse_completion
from hf_dsv4.training.lora import dsv4_lora_config

REPO = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "number"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    return import_recipe("generate_dsv4")


@pytest.fixture(scope="module")
def adapter(tiny_ckpt_fp32, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_ckpt_fp32, dtype=torch.float32),
                           dsv4_lora_config(r=2, alpha=4, targets="all"))  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(generator=torch.Generator().manual_seed(1))
    model.save_pretrained(folder)
    return folder


def test_generate_renders_with_the_template_generates_with_the_adapter_and_parses(
    recipe, tiny_ckpt_fp32, adapter, tmp_path
):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 2."}]
    (tmp_path / "messages.json").write_text(json.dumps(messages))
    args = recipe.GenerateArguments(
        model_name_or_path=str(tiny_ckpt_fp32), adapter=str(adapter), messages=str(tmp_path / "messages.json"),
        tools=json.dumps(TOOLS), max_new_tokens=12, dtype="float32", reasoning_effort="max",
    )  # fmt: skip
    text, message = recipe.generate(args)
    assert message == parse_completion(text, "thinking", tools=TOOLS, strict=False)
    assert message["role"] == "assistant" and "reasoning_content" in message
    # the same greedy continuation, prompt rendered by the encoder, base + adapter loaded by peft directly
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt_fp32)
    prompt = encode_messages([{**messages[0], "tools": TOOLS}, messages[1]], reasoning_effort="max")
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_ckpt_fp32, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.eos_token_id)  # fmt: skip
    assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def test_the_command_line_prints_the_parsed_message_and_refuses_two_prompts(recipe, tiny_ckpt_fp32, capsys):
    recipe.main(["--model_name_or_path", str(tiny_ckpt_fp32), "--prompt", "Hi", "--thinking_mode", "chat",
                 "--max_new_tokens", "5", "--dtype", "float32"])  # fmt: skip
    message = json.loads(capsys.readouterr().out)
    assert message["role"] == "assistant" and "reasoning_content" not in message  # chat mode
    with pytest.raises(ValueError, match="exactly one of --prompt and --messages"):
        recipe.generate(recipe.GenerateArguments(model_name_or_path=str(tiny_ckpt_fp32), prompt="a", messages="[]"))
