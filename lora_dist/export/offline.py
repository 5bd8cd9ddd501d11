"""The offline merge: a base checkpoint and a PEFT-format adapter streamed into a merged checkpoint.

Nothing is loaded whole: every output tensor is a
:class:`~lora_dist.export.sources.RowsSource` over the base files, read one
tensor (or row block) at a time, and written by
:func:`~lora_dist.export.writer.write_checkpoint`; under torchrun/srun/mpirun
the ranks split every tensor's rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_dist.adapter import adapter_chat_template, read_adapter
from lora_dist.dtypes import from_safetensors, parse_dtype
from lora_dist.ranks import RankGroup
from lora_dist.export.layout import plan_layout
from lora_dist.export.params import checkpoint_loras
from lora_dist.export.merged import fp8_sources, stores_fp8
from lora_dist.export.sources import (MERGED_FROM_KEY, RowsSource, file_rows, merged_from, output_specs, stored_rows,
                                      stored_specs)
from lora_dist.export.target import check_output
from lora_dist.export.writer import MODES, write_checkpoint
from lora_dist.merge import MergeError
from lora_dist.model_dir import ModelDir

__all__ = ["merge_offline"]


def merge_offline(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    *,
    mode: str = "auto",
    keep_fp8: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Merge a PEFT-format LoRA adapter into a base HF checkpoint, streaming, into a new checkpoint dir.

    Reads the base one tensor (or row block of at most 256 MiB) at a time.
    When torch.distributed is initialized with more than one rank (torchrun,
    srun, mpirun), every rank merges and writes its share of every tensor's
    rows in parallel; call it on every rank.

    Args:
        base_dir: the base checkpoint dir.
        adapter_dir: a PEFT-format adapter (PEFT's own or ``save_adapter``'s;
            rsLoRA, ``fan_in_fan_out``, ``rank_pattern``/``alpha_pattern``, ``target_parameters``:
            each per-expert tensor of the base gets its expert's rows of the delta).
        out_dir: the checkpoint dir to create; never the base or the adapter, nor a dir containing or inside
            one of them.
        max_shard_size: largest file, decimal units like HF ("5GB" = 5e9 bytes).
        dtype: dtype of the floating tensors written; None keeps the base's. Every tensor must be finite in it.
        overwrite: replace an existing ``out_dir`` if it is a merged checkpoint lora_dist wrote (a user's
            dir, or a model from elsewhere, is refused), once the new one is complete.
        mode: as for :func:`~lora_dist.export.merged.export_merged`.
        keep_fp8: a base stored as block-scaled FP8 is written as it is stored, each adapted weight merged and
            quantized again (as for :func:`~lora_dist.export.merged.export_merged`); False: every weight dense.
        chat_template: the chat template the adapter was trained with, written as ``chat_template.jinja`` in place
            of the base's; default: the adapter dir's ``chat_template.jinja`` (lora_dist writes one there when
            training set ``data.chat_template``), else the base's tokenizer files as they are.

    Returns:
        ``out_dir`` as an absolute path, on every rank.

    Raises:
        OutputExistsError, OutputRefusedError: ``out_dir`` may not be written (see
            :func:`~lora_dist.export.target.check_output`), before anything is read or written.
        ExportOverflowError: a tensor overflows ``dtype`` (fp16 above 65504); nothing is written.
        ExportError, MergeError, AdapterError, ModelDirError.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    group = RankGroup()
    error = None
    try:
        if group.rank == 0:
            check_output(out_dir, [base_dir, adapter_dir], overwrite=overwrite, base_dir=base_dir, what="--out")
        out_dtype = parse_dtype(dtype)
        base = ModelDir(base_dir, "--base")
        loras = checkpoint_loras(base, read_adapter(adapter_dir))
        missing = sorted(k.removesuffix(".weight") for k in loras if k not in base)
        if missing:
            raise MergeError(f"the adapter targets modules that are not in the base checkpoint: {missing[:5]}; "
                             "the adapter was trained on a different base")
        keep_fp8 = keep_fp8 and stores_fp8(base)
        if keep_fp8:  # every stored tensor copied, the adapted FP8 weights merged and quantized again
            specs = stored_specs(base, out_dtype)
            sources = {key: RowsSource(stored_rows(base, key), spec, None) for key, spec in specs.items()}
            for key, lora in loras.items():
                if base.fp8_blocks(key) is not None:
                    sources.update(fp8_sources(base, key, specs, lora))
                elif key in specs:
                    sources[key] = RowsSource(file_rows(base, key), specs[key], lora)
                else:  # an expert of gpt-oss's fused layout, say: no stored tensor of that name
                    raise MergeError(f"{key}: an adapted weight the base does not store under its name cannot be "
                                     "written with the base's FP8 layout; pass --dense")
        else:
            specs = output_specs(base, out_dtype)
            sources = {key: RowsSource(file_rows(base, key), spec, loras.get(key)) for key, spec in specs.items()}
        if chat_template is None:
            chat_template = adapter_chat_template(adapter_dir)
        dtypes = merged_from(from_safetensors(base.dtype(k)) for k in loras)
        layout = plan_layout(list(specs.values()), max_shard_size, {"format": "pt", MERGED_FROM_KEY: dtypes})
    except Exception as e:
        error = e
    group.check(error)
    return write_checkpoint(group, out_dir, base, layout, sources, overwrite=overwrite, mode=mode,
                            config_dtype=out_dtype, inputs=[adapter_dir], what="--out",
                            chat_template=chat_template)
