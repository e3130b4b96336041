"""A plain `transformers.Trainer` with hf_dsv4's plugin (`dsv4_trainer_accelerator`) and `DSV4Callback`, no
DSV4SFTTrainer: `accelerate launch --config_file accelerate_configs/fsdp2_cpu_2proc.yaml plain_trainer_script.py
<checkpoint> <data.jsonl> <output_dir>`. Rank 0 writes `<output_dir>/test_result.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from hf_dsv4 import DSV4Callback, dsv4_lora_config, dsv4_trainer_accelerator, gather_adapter, memory_efficient_init
from hf_dsv4.template import ConversationTokenizer, install_chat_template
from hf_dsv4.training.data import SFTRowTokenizer, tokenize_dataset

if __name__ == "__main__":
    checkpoint, data_file, output_dir = sys.argv[1:4]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    with memory_efficient_init():  # rank 0 reads the checkpoint, rank 1 builds on meta
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="attention+shared"))
    tokenizer = install_chat_template(AutoTokenizer.from_pretrained(checkpoint))
    rows = load_dataset("json", data_files={"train": data_file}, split="train")
    data = tokenize_dataset(rows, SFTRowTokenizer(ConversationTokenizer(tokenizer, max_length=256)))
    callback = DSV4Callback()
    with dsv4_trainer_accelerator():
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[callback],
        )
    trainer.train()
    final = gather_adapter(trainer.model)  # a collective: every rank
    if trainer.is_world_process_zero():
        saved = load_file(Path(output_dir) / "checkpoint-4" / "adapter_model.safetensors")
        result = {
            "log_history": trainer.state.log_history,
            "fsdp": trainer.is_fsdp_enabled,
            "accelerator": [cls.__name__ for cls in type(trainer.accelerator).__mro__[:2]],
            "sharded_params": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            "final_equals_checkpoint": sorted(final) == sorted(saved)
            and all(torch.equal(final[k], saved[k]) for k in saved),
            "adapter_keys": sorted(saved),
            "callback_metrics": callback.last_metrics,
        }
        (Path(output_dir) / "test_result.json").write_text(json.dumps(result))
