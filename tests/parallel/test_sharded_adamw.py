"""ZeRO-1 over the replicated LoRA (:class:`lora_dist.parallel.sharded_adamw.ShardedAdamW`) on 2 ranks.

Against one process's torch AdamW with clip_grad_norm_ on the whole global batch, with
gradient accumulation, clipping active, weight decay and changing lr: the same params
every step, the same moments (gathered, by LoRA name), 1/W of the state per rank, and a
resume from those moments into other buckets that continues exactly.
"""

from __future__ import annotations

import json

import pytest

from distutil import ranks

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("bucket_mb", [25.0, 0.0008])  # one bucket; several (about 2 tensors each)
def test_two_ranks_equal_one_process_adamw(bucket_mb):
    out = ranks(2, "tests/dist_scripts/sharded_adamw.py", str(bucket_mb))
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (report["buckets"] > 2) == (bucket_mb < 1)
    assert report["shard_numel"] <= report["total"] / 2 + report["buckets"]  # 1/W of the state (+ padding)
    # fp32 AdamW on identical gradients up to the summation order of the reduction
    assert report["max_param_diff"] < 1e-6
    assert report["moment_keys_match"] and report["max_moment_diff"] < 1e-6
    assert report["resume_diff"] < 1e-6
    assert report["replicas_equal"]
