"""Load a model sharded by fsdp2 (hybrid or not) and report, per rank (rank<R>.json), what it holds, what it read
from the checkpoint files, and which flat ranges of each sharded base tensor it would write in a merged export.

    torchrun --nproc_per_node 4 tests/dist_scripts/hybrid_layout.py OUT_DIR model.path=... parallel.dp_replicate=2
"""

import json
import sys
from pathlib import Path

import torch

from lora_dist.config import load_config
from lora_dist.launch import init_distributed
from lora_dist.lora import lora_parameters
from lora_dist.model import load_model
from counted_reads import counted_reads
from lora_dist.model_dir import ModelDir
from lora_dist.sharding import owned_range

out_dir, *overrides = sys.argv[1:]
env = init_distributed()
cfg = load_config(None, overrides)
with counted_reads() as reads:  # a rank reads only its own rows / partitions
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0, None).model
read_bytes = reads["bytes"]
lora = {id(p) for p in lora_parameters(model)}
report = {"rank": env.rank, "read_bytes": read_bytes, "base_full_bytes": 0, "placements": [], "mesh": None,
          "owned": {}, "written": {}, "numel": {}}
for name, p in model.named_parameters():
    if id(p) in lora:
        continue
    report["base_full_bytes"] += p.numel() * p.element_size()
    owned = owned_range(p)
    if owned is None:
        continue
    report["placements"].append(str(p.placements))
    report["mesh"] = {"shape": list(p.device_mesh.shape), "dims": list(p.device_mesh.mesh_dim_names or ()),
                      "coordinate": p.device_mesh.get_coordinate()}
    written = owned.written()
    report["numel"][name] = p.numel()
    report["owned"][name] = [owned.start, owned.end]
    report["written"][name] = [written.start, written.end]
    # The bytes this rank loaded are the rows the file holds there.
    full = ModelDir(cfg.model.path).read(name)
    assert torch.equal(owned.local, full.reshape(-1)[owned.start:owned.end].to(owned.local.dtype)), name
report["placements"] = sorted(set(report["placements"]))
Path(out_dir).mkdir(parents=True, exist_ok=True)
(Path(out_dir) / f"rank{env.rank}.json").write_text(json.dumps(report))
