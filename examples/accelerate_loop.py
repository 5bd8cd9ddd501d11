"""A plain accelerate loop on lora_dist: accelerate prepares the dataloader and prints; lora_dist's engine trains.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py MODEL_DIR DATA.jsonl OUT_DIR [fsdp2|zero3|none]

(--multi_gpu is accelerate's torchrun launcher: on a machine without GPUs it starts CPU processes over gloo, as
tests/integrations/test_accelerate_loop.py runs it; --cpu alone starts one process.)

Never pass the model (or an optimizer) to accelerator.prepare(): the model is sharded already and its LoRA
gradients are reduced by the engine; lora_dist refuses it with one line.
"""
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import lora_dist
from lora_dist.data import load_dataset, load_tokenizer
from lora_dist.loss import n_targets
from lora_dist.train import all_sum, lr_at

model_dir, data_path, out = sys.argv[1:4]
env = lora_dist.init_distributed()
steps, lr, micro = 3, 5e-3, 4 // env.world_size  # a global batch of 4 blocks on any world size
lora = lora_dist.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
model, engine = lora_dist.prepare(model_dir, lora, strategy=sys.argv[4] if len(sys.argv) > 4 else "fsdp2", env=env,
                                  train=lora_dist.TrainConfig(lr=lr, micro_batch_size=micro))
accelerator = Accelerator(cpu=engine.device.type == "cpu")
data = load_dataset(data_path, load_tokenizer(model_dir), seq_len=32)
stream = data.indices(0, steps * micro * env.world_size, seed=0).tolist()  # the block order `lora-dist train` reads
loader = accelerator.prepare(DataLoader(stream, batch_size=micro, collate_fn=data.inputs))  # rank r: every W-th batch
for step, batch in enumerate(loader):
    n_tokens = all_sum(torch.tensor(float(n_targets(batch["labels"])), device=engine.device))  # global token mean
    loss = engine.loss_sum(batch) / n_tokens  # forward + summed token loss (chunked head)
    engine.backward(loss)  # in place of accelerator.backward(loss): lora_dist reduces the LoRA gradients
    engine.step(lr_at(step, lr, warmup=1, total=steps, min_ratio=0.1))  # all-reduce, clip, AdamW
    accelerator.print(f"step {step + 1} loss {float(all_sum(loss.detach())):.6f}")
engine.save_adapter(f"{out}/adapter")
lora_dist.exit_distributed()  # destroy the process group and exit, skipping interpreter teardown
