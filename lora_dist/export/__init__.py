"""Merged Hugging Face checkpoints: from a sharded training run, or offline from base + adapter.

* :func:`export_merged` (:mod:`lora_dist.export.merged`) is called by every
  rank after training. Each rank merges the base rows it already holds (FSDP2
  ``Shard(0)`` rows, a ZeRO-3 flat partition, or its share of a replicated
  tensor) with the replicated LoRA A/B, and the result is a normal HF
  checkpoint dir that ``AutoModelForCausalLM.from_pretrained`` loads.
  :func:`lora_dist.session.export_run` does it for a finished run's output dir.
* :func:`merge_offline` (:mod:`lora_dist.export.offline`) streams a base
  checkpoint and a PEFT-format adapter into a merged checkpoint, one tensor (or
  row block) at a time; under torchrun/srun/mpirun the ranks split the work.
* :func:`verify_checkpoint` (:mod:`lora_dist.export.verify`) checks a
  checkpoint dir's files against its index, reads every tensor, compares every
  tensor the merge does not touch with the base (given the base) and
  recomputes a sample of the merged ones (given the adapter too).

The modules: :mod:`~lora_dist.export.layout` (the files planned from the
format, :mod:`lora_dist.safetensors_file`), :mod:`~lora_dist.export.sources` (which bytes each rank produces, and
the blockwise merge), :mod:`~lora_dist.export.writer` (the collective write
below), :mod:`~lora_dist.export.target` (where an export may write, and what
``--overwrite`` may replace), :mod:`~lora_dist.export.errors`; the collectives go
through :class:`lora_dist.ranks.RankGroup`.

Design: files are planned up front and every rank writes its own bytes
-----------------------------------------------------------------------
A safetensors header needs only names, dtypes and shapes, which every rank
knows from the base checkpoint. So every rank computes the same layout (which
file, which byte offset for every tensor; :mod:`lora_dist.export.layout`),
rank 0 creates the files with their headers at full size, and each rank
``pwrite``s its merged rows at their offsets. A dim-0 shard and a ZeRO-3 flat
partition are both one contiguous byte range of the row-major tensor
(:func:`lora_dist.sharding.owned_range`), so no rank ever sends a byte
to another: zero communication, all ranks writing in parallel, and each rank's
extra memory is one merged block of its own shard. The alternative - an owner
rank per tensor collecting it from the others - moves the whole model over the
network once and serializes on the owners.

That needs a filesystem every rank sees (Lustre, GPFS, NFS, a single node's
disk). Where the output dir is node-local, rank 0 collects instead: it gathers
each sharded tensor's merged pieces (one tensor at a time, so rank 0 holds at
most the largest tensor) and writes every file itself, and the checkpoint ends
up on rank 0's node. ``mode="auto"`` (the default) picks between the two by
checking that every rank can see a probe file rank 0 wrote into the staging
dir; ``mode="shared"`` / ``"gather"`` force one.

Tensors without LoRA are copied from the base checkpoint files, not from the
sharded model: they are frozen, so the files hold exactly the values trained
against, at full precision even when training kept the base in bf16, and the
output then holds exactly the base's keys - tied weights (GPT-2 keeps only
``transformer.wte.weight``), persistent buffers and all - with no name mapping
from the model. LoRA-targeted weights come from the model's own shards.

The LoRA update is computed in fixed blocks of :data:`MERGE_BLOCK_ROWS` rows at
absolute row offsets, each through :func:`lora_dist.merge.merge_weight` (fp32,
NaN/Inf checked); a rank whose shard starts or ends inside a block pads it with
zeros and keeps its own part. The merged bytes therefore do not depend on how
the rows were sharded: on the same hardware, 1, 2 or 3 ranks, FSDP2 or ZeRO-3
and :func:`merge_offline` give identical files.

Writes are atomic (:mod:`lora_dist.atomic`): everything goes to a
``.<out_dir name>.tmp-XXXX`` sibling that is fsynced and renamed into place at
the end; an existing output is replaced only with ``overwrite=True``, only
once the new one is complete, and only if it is a merged checkpoint lora_dist
wrote; an input (or a dir containing or inside one) is never an output
(:mod:`~lora_dist.export.target`). Every tensor must be finite in the dtype it
is written in: an fp16/bf16 overflow fails the export and nothing is published.
"""

from lora_dist.export.errors import ExportError, ExportOverflowError, OutputExistsError, OutputRefusedError
from lora_dist.export.merged import export_merged, merge_targets
from lora_dist.export.offline import merge_offline
from lora_dist.export.sources import MERGE_BLOCK_ROWS
from lora_dist.export.target import check_output, is_merged_export
from lora_dist.export.verify import VerifyError, VerifyReport, verify_checkpoint

__all__ = [
    "MERGE_BLOCK_ROWS",
    "ExportError",
    "ExportOverflowError",
    "OutputExistsError",
    "OutputRefusedError",
    "VerifyError",
    "VerifyReport",
    "check_output",
    "export_merged",
    "is_merged_export",
    "merge_offline",
    "merge_targets",
    "verify_checkpoint",
]
