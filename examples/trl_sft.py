"""TRL's SFTTrainer on lora_dist, through LoraDistMixin: TRL prepares the data, lora_dist shards, reduces and saves.

    torchrun --nproc_per_node 2 examples/trl_sft.py MODEL_DIR DATA.jsonl OUT_DIR [--strategy fsdp2] [--examples N]
"""
import argparse

import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

from lora_dist import LoRAConfig, exit_distributed, init_distributed
from lora_dist.data import load_tokenizer
from lora_dist.integrations.hf import LoraDistMixin


class LoraDistSFTTrainer(LoraDistMixin, SFTTrainer):
    """SFTTrainer with lora_dist's model, engine and outputs (the mixin goes first)."""


parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("data", help="a .jsonl of prompt/completion (or text, or messages) records")
parser.add_argument("out")
parser.add_argument("--strategy", default="fsdp2")
parser.add_argument("--examples", type=int, default=0, help="train on the first N records only (0: all)")
parser.add_argument("--global-batch", type=int, default=4)
parser.add_argument("--steps", type=int, default=3)
a = parser.parse_args()

world = init_distributed().world_size
dataset = load_dataset("json", data_files=a.data, split="train")
if a.examples:
    dataset = dataset.select(range(a.examples))
args = SFTConfig(
    output_dir=a.out, per_device_train_batch_size=a.global_batch // world, max_steps=a.steps, learning_rate=5e-3,
    warmup_steps=1, max_length=32, logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
    bf16=False, activation_checkpointing=False,  # SFTConfig's defaults; lora_dist's: parallel=ParallelConfig(...)
    use_cpu=not torch.cuda.is_available())  # accelerate sees CPU processes only with use_cpu=True
trainer = LoraDistSFTTrainer(model=a.model_dir, lora=LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                             strategy=a.strategy, args=args, train_dataset=dataset,
                             processing_class=load_tokenizer(a.model_dir))
trainer.train()
trainer.save_model(f"{a.out}/adapter")  # PEFT format, from any strategy
exit_distributed()  # destroy the process group and exit, skipping interpreter teardown
