"""Your own torch loop on lora_dist: the steps `lora-dist train` takes, written out.

    torchrun --nproc_per_node 2 examples/custom_loop.py MODEL_DIR DATA.jsonl OUT_DIR [fsdp2|zero3|ddp|none]
"""
import contextlib
import sys

import torch

import lora_dist
from lora_dist.data import load_dataset, load_tokenizer
from lora_dist.loss import n_targets
from lora_dist.train import all_sum, lr_at

model_dir, data_path, out = sys.argv[1:4]
env = lora_dist.init_distributed()  # torchrun, Slurm, MPI or one process
steps, lr, accum, micro = 3, 5e-3, 1, 4 // env.world_size  # a global batch of 4 blocks on any world size
lora = lora_dist.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
model, engine = lora_dist.prepare(model_dir, lora, strategy=sys.argv[4] if len(sys.argv) > 4 else "fsdp2", env=env,
                                  train=lora_dist.TrainConfig(lr=lr, micro_batch_size=micro, grad_accum=accum))
data = load_dataset(data_path, load_tokenizer(model_dir), seq_len=32)
for step in range(steps):
    batches = [data.micro_batch(((step * accum + m) * env.world_size + env.rank) * micro, micro, seed=0,
                                device=engine.device) for m in range(accum)]
    n_tokens = all_sum(torch.tensor(float(sum(n_targets(b["labels"]) for b in batches)), device=engine.device))
    for m, batch in enumerate(batches):  # the loss is the global token mean; gradients sync on the last micro-batch
        with engine.no_sync() if m < accum - 1 else contextlib.nullcontext():
            engine.backward(engine.loss_sum(batch) / n_tokens)  # forward + summed token loss (chunked head)
    engine.step(lr_at(step, lr, warmup=1, total=steps, min_ratio=0.1))  # all-reduce LoRA grads, clip, AdamW
engine.save_adapter(f"{out}/adapter")
engine.export_merged(f"{out}/merged")
lora_dist.exit_distributed()  # destroy the process group and exit, skipping interpreter teardown
