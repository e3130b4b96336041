"""TRL's SFTTrainer with `assistant_only_loss=True` trains a DeepSeek-V4 tool conversation through our template."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import DeepseekV4ForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from hf_dsv4.template import install_chat_template, tokenize_conversation
from hf_dsv4.testing import tiny_dsv4_config, tiny_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _conversation(city: str, temp: int) -> list[dict]:
    args = json.dumps({"city": city})  # datasets store arguments as JSON strings
    return [
        {"role": "user", "content": f"Weather in {city}?"},
        {
            "role": "assistant",
            "reasoning_content": "Call the tool.",
            "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": args}}],
        },
        {"role": "tool", "tool_call_id": "c0", "content": json.dumps({"temp": temp})},
        {"role": "assistant", "reasoning_content": "Answer.", "content": f"It is {temp} degrees in {city}."},
    ]


@pytest.fixture(scope="module")
def tok():
    return install_chat_template(tiny_tokenizer())


def test_template_trains_the_end_of_turn_token_by_trls_own_check(tok):
    assert is_chat_template_stop_token_trained(tok)


def test_sft_trainer_with_assistant_only_loss_trains_exactly_our_labels(tok, tmp_path):
    rows = [{"messages": _conversation(c, t), "tools": json.dumps(TOOLS)} for c, t in [("Paris", 21), ("Oslo", 3)]]
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(tiny_dsv4_config())
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        # TRL 1.16 computes Mixtral's load-balancing loss from `config.num_experts`, which DeepseekV4Config does not
        # have (it has `n_routed_experts`; V4 balances with `e_score_correction_bias`, not an aux loss): turn it off.
        router_aux_loss_coef=0.0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)

    # the labels TRL built from the template's assistant mask equal ours, token for token
    for row, processed in zip(rows, trainer.train_dataset):
        ours = tokenize_conversation(tok, row["messages"], TOOLS)
        assert processed["input_ids"] == ours["input_ids"]
        assert processed["labels"] == ours["labels"]
        assert sum(label != -100 for label in ours["labels"]) > 0

    # ... and the collated labels are -100 exactly outside the assistant spans
    batch = next(iter(trainer.get_train_dataloader()))
    for i, row in enumerate(rows):
        ours = tokenize_conversation(tok, row["messages"], TOOLS)
        n = len(ours["labels"])
        assert batch["labels"][i, :n].tolist() == ours["labels"]

    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 3
