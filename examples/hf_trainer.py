"""transformers.Trainer on lora_dist: the base sharded, LoRA replicated and all-reduced, a PEFT adapter out.

    torchrun --nproc_per_node 2 examples/hf_trainer.py MODEL_DIR DATA.jsonl OUT_DIR [--strategy fsdp2] [--blocks N]
"""
import argparse

import torch
from transformers import TrainingArguments, default_data_collator

from lora_dist import LoRAConfig, exit_distributed, init_distributed
from lora_dist.data import load_dataset, load_tokenizer
from lora_dist.integrations.hf import LoraDistTrainer

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("--strategy", default="fsdp2")
parser.add_argument("--blocks", type=int, default=0, help="train on the first N blocks only (0: all)")
parser.add_argument("--global-batch", type=int, default=4)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--save-steps", type=int, default=0)
parser.add_argument("--resume", default=None, help="a checkpoint-N dir to resume from")
parser.add_argument("--merged-dtype", default="bfloat16")
parser.add_argument("--eval", action="store_true", help="evaluate on the training blocks after the last step")
a = parser.parse_args()

world = init_distributed().world_size
tokenizer = load_tokenizer(a.model_dir)
blocks = load_dataset(a.data, tokenizer, seq_len=32)
n = a.blocks or len(blocks)
train = [{"input_ids": blocks.input_ids[i], "labels": blocks.labels[i]} for i in range(n)]
args = TrainingArguments(
    output_dir=a.out, per_device_train_batch_size=a.global_batch // world, max_steps=a.steps, learning_rate=5e-3,
    warmup_steps=1, lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=1, report_to=[],
    save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
    eval_strategy="steps" if a.eval else "no", eval_steps=a.steps, per_device_eval_batch_size=a.global_batch // world, seed=0, disable_tqdm=True,
    use_cpu=not torch.cuda.is_available())  # accelerate sees CPU processes only with use_cpu=True
trainer = LoraDistTrainer(model=a.model_dir, lora=LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                          strategy=a.strategy, args=args, train_dataset=train, eval_dataset=train if a.eval else None,
                          data_collator=default_data_collator,
                          processing_class=tokenizer)
trainer.train(resume_from_checkpoint=a.resume)
trainer.save_model(f"{a.out}/adapter")  # PEFT format, from any strategy
trainer.export_merged(f"{a.out}/merged", dtype=a.merged_dtype)  # merged from the shards; ends training
exit_distributed()  # destroy the process group and exit, skipping interpreter teardown
