"""2 ranks standing for 2 nodes (one rank each): each opens ``model.path`` from its own copy, argv[1 + rank], with
``open_base`` (which compares the nodes' copies). Prints each rank's outcome as a JSON line on rank 0."""

import json
import sys

import torch.distributed as dist

from lora_dist.config import Config
from lora_dist.launch import LaunchEnv
from lora_dist.model_dir import ModelDirError
from lora_dist.session import open_base

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = Config()
cfg.model.path = sys.argv[1 + rank]
env = LaunchEnv("torchrun", rank, 0, 2, 1, rank, 2, "127.0.0.1", 0)
try:
    open_base(cfg, env)
    outcome = None
except ModelDirError as e:
    outcome = str(e)
seen = [None, None]
dist.all_gather_object(seen, outcome)
if rank == 0:
    print(json.dumps(seen))
dist.destroy_process_group()
