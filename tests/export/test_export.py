"""Merged export from a (sharded) LoRA model: lora_dist.export.export_merged."""

from __future__ import annotations

import errno
import filecmp
import json
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from dist_scripts.export_common import SCRIPTS, build_lora_model, input_ids
from distutil import REPO, ranks
from safetensors import safe_open

from lora_dist.adapter import read_adapter, save_adapter
from lora_dist.export import (
    ExportError,
    OutputExistsError,
    OutputRefusedError,
    export_merged,
    layout,
    merge_offline,
    verify_checkpoint,
)
from lora_dist.export.layout import parse_size
from lora_dist.merge import merge_state_dict
from lora_dist.model_dir import SAFE_INDEX, SAFE_SINGLE, ModelDir


@pytest.fixture(scope="module")
def bases(tiny_checkpoint) -> dict[str, Path]:
    """Dims that do not divide by 3 (uneven shards on 3 ranks): llama hidden 64, GPT-2 hidden 40."""
    return {"llama": tiny_checkpoint("llama", hidden=64), "gpt2": tiny_checkpoint("gpt2", hidden=40)}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = ModelDir(path)
    return {k: ckpt.read(k) for k in ckpt.keys()}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def single_process_reference(base: Path, adapter: Path, out: Path) -> Path:
    """The single-process merged export of the same model: base + adapter, unsharded."""
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    load_adapter(model, adapter)
    return export_merged(model, out, base, dtype=torch.float32, max_shard_size="200KB")


def no_staging_left(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_parse_size_uses_decimal_units_like_hf():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200KB") == 200_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("5 parsecs")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers_with_the_lora_models_logits(bases, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = build_lora_model(bases[arch], arch)
    with torch.no_grad():
        expected = model(input_ids()).logits
    out = export_merged(model, tmp_path / "merged", bases[arch], dtype=torch.float32)
    assert (out / SAFE_SINGLE).is_file() and not (out / SAFE_INDEX).exists()
    assert set(tensors(out)) == set(ModelDir(bases[arch]).keys())  # GPT-2: no lm_head.weight, as in the base
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (bases[arch] / name).read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = merged(input_ids()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merged_tensors_equal_the_reference_merge(bases, tmp_path):
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    save_adapter(model, tmp_path / "adapter")
    out = export_merged(model, tmp_path / "merged", base, dtype=torch.float32, max_shard_size="200KB")
    reference = merge_state_dict(tensors(base), read_adapter(tmp_path / "adapter").weights())
    got = tensors(out)
    assert set(got) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(got[key], tensor), key
    offline = merge_offline(base, tmp_path / "adapter", tmp_path / "offline", dtype="fp32", max_shard_size="200KB")
    assert same_files(out, offline)


def test_dtype_bf16_and_config(bases, tmp_path):
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    save_adapter(model, tmp_path / "adapter")
    out = export_merged(model, tmp_path / "merged", base)  # default bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    report = verify_checkpoint(out, base, tmp_path / "adapter")
    assert len(report.compared) == 8


def test_export_from_a_bf16_base_to_fp32_verifies_with_bf16_tolerance(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter

    base = bases["llama"]
    save_adapter(build_lora_model(base, "llama"), tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # base held in bf16 while training
    load_adapter(model, tmp_path / "adapter")
    out = export_merged(model, tmp_path / "merged", base, dtype=torch.float32)
    report = verify_checkpoint(out, base, tmp_path / "adapter", sample=None)
    assert report.max_abs_diff > 0  # not exact, and accepted


def test_max_shard_size_splits_files_and_index_is_right(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    base = bases["llama"]
    model = build_lora_model(base, "llama")
    out = export_merged(model, tmp_path / "merged", base, dtype=torch.float32, max_shard_size="100KB")
    index = json.loads((out / SAFE_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            keys = list(f.keys())
            nbytes = [f.get_tensor(k).nbytes for k in keys]
        assert all(index["weight_map"][k] == name for k in keys)
        assert sum(nbytes) <= 100_000 or len(keys) == 1
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(ModelDir(base).keys())
    AutoModelForCausalLM.from_pretrained(out)
    verify_checkpoint(out)


# ----------------------------------------------------------------------------- atomic writes


def test_existing_output_is_refused_without_overwrite(bases, tmp_path):
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError) as info:
        export_merged(model, out, base)
    message = str(info.value)
    assert "--overwrite" in message and "output.overwrite=true" in message and "\n" not in message
    assert (out / "keep.txt").read_text() == "old" and no_staging_left(out)

    # --overwrite replaces only what lora_dist wrote: a user's folder stays as it is (issue 15, item 3)
    with pytest.raises(OutputRefusedError, match="keep.txt, which lora_dist does not write") as info:
        export_merged(model, out, base, overwrite=True)
    assert "\n" not in str(info.value) and "move it away" in str(info.value)
    assert (out / "keep.txt").read_text() == "old" and no_staging_left(out)

    (out / "keep.txt").unlink()
    out.rmdir()
    export_merged(model, out, base)
    export_merged(model, out, base, overwrite=True)  # an export lora_dist wrote is replaced
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no .tmp- / .old- leftovers


def test_output_may_not_be_the_base(bases, tmp_path):
    base = Path(shutil.copytree(bases["llama"], tmp_path / "base"))
    model = build_lora_model(base, "llama")
    with pytest.raises(ExportError, match="is the input"):
        export_merged(model, base, base, overwrite=True)
    assert same_files(base, bases["llama"])


def test_crash_mid_write_leaves_no_output(bases, tmp_path, monkeypatch):
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    calls = []
    real = layout.pwrite_tensor

    def crash_after_three(fd, tensor, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise RuntimeError("simulated crash")
        real(fd, tensor, offset)

    monkeypatch.setattr(layout, "pwrite_tensor", crash_after_three)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_merged(model, out, base, max_shard_size="100KB")
    assert not out.exists() and no_staging_left(out)


def test_disk_full_is_a_clear_error_and_cleans_up(bases, tmp_path, monkeypatch):
    base = bases["llama"]
    model = build_lora_model(base, "llama")

    def no_space(fd, tensor, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layout, "pwrite_tensor", no_space)
    out = tmp_path / "merged"
    with pytest.raises(ExportError, match="no space left on the device"):
        export_merged(model, out, base)
    assert not out.exists() and no_staging_left(out)


def test_too_little_free_space_is_refused_up_front(bases, tmp_path, monkeypatch):
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "merged"
    with pytest.raises(ExportError, match="not enough space"):
        export_merged(model, out, base)
    assert not out.exists() and no_staging_left(out)


def test_a_filesystem_reporting_no_free_space_is_left_to_the_writes(bases, tmp_path, monkeypatch):
    """Some network filesystems report 0 bytes free: as for adapters, the writes themselves decide."""
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 0))
    out = export_merged(model, tmp_path / "merged", base)
    verify_checkpoint(out)


def test_killed_export_leaves_nothing_that_looks_complete(bases, tmp_path):
    """A process killed mid-write leaves only a .merged.tmp- sibling without index or config."""
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from dist_scripts.export_common import build_lora_model
        from lora_dist.export import export_merged, layout
        model = build_lora_model({str(bases["llama"])!r}, "llama")
        real, calls = layout.pwrite_tensor, []
        def die(*args):
            calls.append(1)
            if len(calls) > 5:
                os._exit(3)
            real(*args)
        layout.pwrite_tensor = die
        export_merged(model, {str(out)!r}, {str(bases["llama"])!r}, max_shard_size="100KB")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not out.exists()
    (staging,) = tmp_path.glob(".merged.tmp-*")
    assert not (staging / "config.json").exists() and not (staging / SAFE_INDEX).exists()
    assert list(staging.glob("*.safetensors"))  # a partial checkpoint: what the next export must not leave behind

    # The next export of the same output removes it (its writer is dead: its mark's lock is free).
    export_merged(build_lora_model(bases["llama"], "llama"), out, bases["llama"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert verify_checkpoint(out, bases["llama"]).tensors == len(tensors(bases["llama"]))  # raises if incomplete


def test_a_file_removed_from_the_staging_dir_is_never_published(bases, tmp_path, monkeypatch):
    """Something removes a shard while the ranks write (a sweep where flock is node-local, a user's rm): the
    export fails before publishing anything."""
    from lora_dist.export import writer

    base = bases["llama"]
    out = tmp_path / "merged"
    real = writer._finalize

    def shard_removed(staging, *args):
        next(Path(staging).glob("model-*.safetensors")).unlink()
        return real(staging, *args)

    monkeypatch.setattr(writer, "_finalize", shard_removed)
    with pytest.raises(ExportError, match=r"model-\S+ is missing in the staging dir .*nothing was published"):
        export_merged(build_lora_model(base, "llama"), out, base, max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []


def test_an_export_set_aside_by_a_killed_replace_is_put_back_first(bases, tmp_path):
    """Killed between the two renames of ``--overwrite`` (no RENAME_EXCHANGE: NFS, Lustre), an export of ``O``
    leaves the previous one as ``.O.old-*`` and no ``O``: the next export of ``O`` puts it back before anything."""
    base = bases["llama"]
    model = build_lora_model(base, "llama")
    out = tmp_path / "merged"
    export_merged(model, out, base)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".merged.old-1a2b3c4d")  # what the kill leaves

    with pytest.raises(OutputExistsError):  # the previous export is back, so this needs --overwrite
        export_merged(model, out, base)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    out.rename(tmp_path / ".merged.old-1a2b3c4d")
    export_merged(model, out, base, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # replaced, nothing set aside left
    assert verify_checkpoint(out, base).tensors == len(tensors(base))


# ----------------------------------------------------------------------------- distributed


def test_a_rank_owning_no_rows_writes_nothing():
    """torch.chunk gives 4 rows to 3 ranks as 2, 2, 0: rank 2's shard is empty (fake process group, rank 2 of 3)."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        from lora_dist.export.layout import TensorSpec
        from lora_dist.export.sources import param_source
        dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=3)
        mesh = init_device_mesh("cpu", (3,))
        for rows, expected in ((4, []), (7, [(30, 35)])):
            local = torch.zeros(len(range(rows)[2 * -(-rows // 3):]), 5)
            param = DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size([rows, 5]), stride=(5, 1),
                                       run_check=False)
            source = param_source(param, TensorSpec("w", torch.float32, (rows, 5)), None)
            assert [(p.start, p.end) for p in source.pieces(2, 3)] == expected, rows
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]



@pytest.mark.dist
def test_two_ranks_fsdp2_and_ddp_equal_single_process(bases, tmp_path):
    base = bases["llama"]
    ranks(2, str(SCRIPTS / "export_fsdp2.py"), str(base), str(tmp_path), "llama",
          "--modes", "auto,gather,blind,ddp")
    reference = single_process_reference(base, tmp_path / "adapter", tmp_path / "single")
    written = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    # A shared filesystem: every rank wrote its own rows into the files.
    assert same_files(tmp_path / "merged_auto", reference)
    assert written[0]["auto"] > 0 and written[1]["auto"] > 0
    # Rank 0 collected and wrote everything: forced, and chosen because rank 1 could not see the dir.
    for mode in ("gather", "blind"):
        assert same_files(tmp_path / f"merged_{mode}", reference)
        assert written[1][mode] == 0 and written[0][mode] == written[0]["auto"] + written[1]["auto"]
    # DDP: replicated params, each rank writes its share of the rows.
    assert same_files(tmp_path / "merged_ddp", reference)
    assert written[0]["ddp"] > 0 and written[1]["ddp"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fsdp2_three_uneven_ranks_equal_single_process(bases, tmp_path, arch):
    """64 and 40 rows do not split into 3 equal shards; GPT-2 adds Conv1D (fan_in_fan_out) and tied embeddings."""
    base = bases[arch]
    ranks(3, str(SCRIPTS / "export_fsdp2.py"), str(base), str(tmp_path), arch)
    reference = single_process_reference(base, tmp_path / "adapter", tmp_path / "single")
    assert same_files(tmp_path / "merged_auto", reference)
    verify_checkpoint(tmp_path / "merged_auto", base, tmp_path / "adapter", sample=None)


@pytest.mark.dist
def test_zero3_two_ranks_equal_single_process(bases, tmp_path):
    base = bases["llama"]
    ranks(2, str(SCRIPTS / "export_zero3.py"), str(base), str(tmp_path), "llama")
    reference = single_process_reference(base, tmp_path / "adapter", tmp_path / "single")
    assert same_files(tmp_path / "merged_auto", reference)


@pytest.mark.dist
def test_disk_full_on_one_rank_fails_every_rank_and_cleans_up(bases, tmp_path):
    ranks(2, str(SCRIPTS / "export_fsdp2.py"), str(bases["llama"]), str(tmp_path), "llama",
          "--fail-rank", "1")
    results = [json.loads((tmp_path / f"result_{r}.json").read_text())["raised"] for r in range(2)]
    assert "no space left on the device" in results[1]
    assert results[0].startswith("rank 1 failed") and "no space left" in results[0]
    assert not (tmp_path / "merged_fail").exists() and no_staging_left(tmp_path / "merged_fail")
