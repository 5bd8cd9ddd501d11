"""Build one model eager and one with compiled blocks, run what a run varies through the compiled one, and report
(JSON to OUT): whether the state dict keys match, which blocks run compiled, the KV-cache requests, the compiled
graphs and graph breaks. Its own process: dynamo's caches stay out of the test worker."""

import json
import sys
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lora_dist.blocks import find_blocks
from lora_dist.config import load_config
from lora_dist.launch import LaunchEnv
from lora_dist.model_dir import ModelDir
from lora_dist.session import build

out, *overrides = sys.argv[1:]
#: (length, packed) of the batches run through the compiled model; ``--packed-only``: the packed ones (the default
#: data layout), which still compile for a new length
SHAPES = [(32, False), (24, False), (32, True), (20, True), (28, False)]
if "--packed-only" in overrides:
    overrides.remove("--packed-only")
    SHAPES = [shape for shape in SHAPES if shape[1]]
env = LaunchEnv("torchrun", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)
report, names = {}, {}
for compiled in (False, True):
    cfg = load_config(None, [*overrides, "parallel.strategy=none", f"parallel.compile={compiled}", "output.dir=unused"])
    model, engine = build(cfg, env, torch.device("cpu"), ModelDir(cfg.model.path), None)
    names[compiled] = list(model.state_dict())
    report[f"compiled_blocks_{compiled}"] = [getattr(b, "_compiled_call_impl", None) is not None
                                             for b in find_blocks(model)]
report["same_names"] = names[True] == names[False]

caches = []
model.register_forward_pre_hook(lambda _, args, kwargs: caches.append(kwargs.get("use_cache")), with_kwargs=True)
torch._dynamo.reset()
counters.clear()
torch._dynamo.config.fail_on_recompile_limit_hit = True  # a fallback to eager raises instead
generator = torch.Generator().manual_seed(0)
for length, packed in SHAPES:
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    inputs = {"input_ids": ids}
    if packed:  # two documents in each row: positions restart, a block-diagonal causal mask
        half = length // 2
        inputs["position_ids"] = torch.cat([torch.arange(half), torch.arange(length - half)]).expand(2, -1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        causal[half:, :half] = False
        inputs["attention_mask"] = causal.expand(2, 1, length, length)
    engine.forward_loss_sum(inputs, ids).backward()
with torch.no_grad():
    engine.forward_loss_sum({"input_ids": ids}, ids)
report.update(use_cache=sorted(set(map(str, caches))), graphs=counters["stats"]["unique_graphs"],
              graph_breaks=dict(counters["graph_break"]))
Path(out).write_text(json.dumps(report))
