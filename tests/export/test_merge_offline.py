"""Offline streaming merge, checkpoint verification and their commands (lora_dist.export, lora_dist.cli)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_scripts.export_common import SCRIPTS
from distutil import randomize_lora_B, ranks

from lora_dist.cli import main
from lora_dist.export import OutputExistsError, VerifyError, merge_offline, verify_checkpoint
from lora_dist.safetensors_file import read_header
from lora_dist.model_dir import SAFE_INDEX, ModelDir

PEFT_CASES = {
    # rsLoRA with per-module ranks and alphas
    "llama": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 32}),
    # GPT-2's Conv1D stores weights (in, out): fan_in_fan_out
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
}


@pytest.fixture(scope="module")
def bases(tiny_checkpoint) -> dict[str, Path]:
    """Dims that do not divide by 3 (uneven shards on 3 ranks): llama hidden 64, GPT-2 hidden 40."""
    return {"llama": tiny_checkpoint("llama", hidden=64), "gpt2": tiny_checkpoint("gpt2", hidden=40)}


def peft_adapter(base: Path, arch: str, adapter_dir: Path, merged_dir: Path | None = None) -> Path:
    """A PEFT-made adapter with random B; optionally PEFT's own merge_and_unload() saved too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**PEFT_CASES[arch]))
    randomize_lora_B(model, 0, 0.1)
    model.save_pretrained(adapter_dir)
    if merged_dir is not None:
        model.merge_and_unload().save_pretrained(merged_dir)
    return adapter_dir


@pytest.fixture(scope="module")
def merged(bases, tmp_path_factory) -> dict[str, Path]:
    """A multi-file offline merge of a PEFT llama adapter, for the verify tests to tamper with copies of."""
    root = tmp_path_factory.mktemp("merged")
    adapter = peft_adapter(bases["llama"], "llama", root / "adapter")
    out = merge_offline(bases["llama"], adapter, root / "out", max_shard_size="100KB")
    return {"base": bases["llama"], "adapter": adapter, "out": out}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_offline_merge_equals_peft_merge_and_unload(bases, tmp_path, arch):
    adapter = peft_adapter(bases[arch], arch, tmp_path / "adapter", tmp_path / "peft_merged")
    out = merge_offline(bases[arch], adapter, tmp_path / "out", max_shard_size="100KB")
    ours, peft = ModelDir(out), ModelDir(tmp_path / "peft_merged")
    assert sorted(ours.keys()) == sorted(peft.keys())
    changed = 0
    for key in peft.keys():
        assert torch.equal(ours.read(key), peft.read(key)), key
        changed += not torch.equal(ours.read(key), ModelDir(bases[arch]).read(key))
    assert changed == (6 if arch == "llama" else 4)  # 3 (llama) or 2 (GPT-2) targets x 2 layers


def test_a_merge_that_keeps_the_dtype_builds_no_model(merged, tmp_path, monkeypatch):
    """Only bf16 and fp16 keep some tensors in fp32 (``kept_in_fp32``): a merge in the base's dtype streams tensors
    and never builds the model's skeleton for its rule (seconds and ~100 MB; the offline merge took 2.5x longer)."""
    import lora_dist.model_dir as model_dir

    def no_skeleton(base):
        raise AssertionError("the model was built")

    monkeypatch.setattr(model_dir, "skeleton", no_skeleton)
    for dtype in (None, "fp32"):
        out = merge_offline(merged["base"], merged["adapter"], tmp_path / f"out-{dtype}", dtype=dtype)
        assert ModelDir(out).keys() == ModelDir(merged["out"]).keys()
    with pytest.raises(AssertionError, match="the model was built"):  # bf16 asks the model what it keeps in fp32
        merge_offline(merged["base"], merged["adapter"], tmp_path / "bf16", dtype="bf16")


def test_offline_merge_casts_to_dtype_and_refuses_existing_output(merged, tmp_path):
    out = merge_offline(merged["base"], merged["adapter"], tmp_path / "bf16", dtype="bf16")
    assert {ModelDir(out).read(k).dtype for k in ModelDir(out).keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    verify_checkpoint(out, merged["base"], merged["adapter"], sample=None)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge_offline(merged["base"], merged["adapter"], out)


def test_adapter_for_another_base_is_refused_and_nothing_is_left(merged, tmp_path):
    from lora_dist.demo import make_tiny_checkpoint
    from lora_dist.merge import MergeError

    narrow = make_tiny_checkpoint(tmp_path / "narrow", "llama", hidden=32, layers=2)
    with pytest.raises(MergeError, match="different base"):
        merge_offline(narrow, merged["adapter"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow"]


# ----------------------------------------------------------------------------- verify


def tampered(merged: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(merged["out"], copy)
    return copy


def locate(out: Path, key: str) -> tuple[Path, int, int]:
    """File and absolute byte range of a tensor."""
    name = json.loads((out / SAFE_INDEX).read_text())["weight_map"][key]
    entry = read_header(out / name)[1][key]
    return out / name, entry.begin, entry.end


def test_verify_passes_on_good_output(merged):
    report = verify_checkpoint(merged["out"], merged["base"], merged["adapter"], sample=8)
    assert report.tensors == len(ModelDir(merged["base"]).keys())
    assert len(report.files) > 3 and report.max_abs_diff == 0.0
    assert report.compared[:6] == sorted(report.compared[:6]) and all("proj" in k for k in report.compared[:6])
    assert len(report.compared) == 8
    assert "OK" in report.summary()


def test_verify_catches_flipped_bytes_in_a_merged_tensor(merged, tmp_path):
    out = tampered(merged, tmp_path)
    key = "model.layers.1.self_attn.v_proj.weight"
    path, begin, end = locate(out, key)
    data = bytearray(path.read_bytes())
    for i in range(begin + 40, begin + 48, 4):
        data[i + 1] ^= 0x04  # mantissa bit 10: still finite, off by ~1e-4 relative; only the recomputation can tell
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"{key}.*differs from base \+ adapter"):
        verify_checkpoint(out, merged["base"], merged["adapter"])


def test_verify_accepts_a_merge_summed_in_another_order_and_nothing_more(merged, tmp_path):
    """A GPU's matmul may sum ``B @ A`` in another order: fp32 merges may differ in the last bits, no more."""
    from safetensors.torch import load_file, save_file

    from lora_dist.adapter import read_adapter

    weights = read_adapter(merged["adapter"]).weights()
    base = ModelDir(merged["base"])

    def rewrite(out: Path, merge) -> Path:
        """``out``'s LoRA-targeted tensors recomputed by ``merge(w0, lora)``, in place."""
        for name in {json.loads((out / SAFE_INDEX).read_text())["weight_map"][f"{m}.weight"] for m in weights}:
            tensors = load_file(out / name)
            for module, lora in weights.items():
                if f"{module}.weight" in tensors:
                    tensors[f"{module}.weight"] = merge(base.read(f"{module}.weight"), lora)
            save_file(tensors, out / name, metadata=read_header(out / name)[0])
        return out

    def reordered(w0, lora):  # the r-term sums in reverse order, one term at a time
        delta = torch.zeros_like(w0)
        for j in reversed(range(lora.r)):
            delta += torch.outer(lora.lora_B[:, j], lora.lora_A[j])
        return w0 + delta * lora.scale

    out = rewrite(tampered(merged, tmp_path / "a"), reordered)
    assert any(not torch.equal(ModelDir(out).read(f"{m}.weight"), ModelDir(merged["out"]).read(f"{m}.weight"))
               for m in weights)  # the order matters in fp32 ...
    verify_checkpoint(out, merged["base"], merged["adapter"], sample=None)  # ... and verify allows it

    def one_ulp_off(w0, lora):
        right = w0 + (lora.lora_B @ lora.lora_A) * lora.scale
        return torch.nextafter(right, torch.full_like(right, float("inf")))

    verify_checkpoint(rewrite(tampered(merged, tmp_path / "b"), one_ulp_off), merged["base"], merged["adapter"])

    def scale_off(w0, lora):  # what a wrong alpha would give, however slightly
        return w0 + (lora.lora_B @ lora.lora_A) * (lora.scale * (1 + 1e-4))

    with pytest.raises(VerifyError, match=r"differs from base \+ adapter"):
        verify_checkpoint(rewrite(tampered(merged, tmp_path / "c"), scale_off), merged["base"], merged["adapter"])


def test_verify_catches_nan(merged, tmp_path):
    out = tampered(merged, tmp_path)
    path, begin, _ = locate(out, "model.norm.weight")
    data = bytearray(path.read_bytes())
    data[begin : begin + 4] = bytes.fromhex("0000c07f")  # fp32 NaN
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="model.norm.weight.*NaN"):
        verify_checkpoint(out)


def test_verify_catches_a_deleted_file(merged, tmp_path):
    out = tampered(merged, tmp_path)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(VerifyError, match=rf"{victim.name} is listed in the index but missing"):
        verify_checkpoint(out)


def test_verify_catches_a_wrong_total_size(merged, tmp_path):
    out = tampered(merged, tmp_path)
    index = json.loads((out / SAFE_INDEX).read_text())
    index["metadata"]["total_size"] += 4
    (out / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(VerifyError, match="total_size"):
        verify_checkpoint(out)


def test_verify_catches_a_truncated_file_and_a_wrong_weight_map(merged, tmp_path):
    out = tampered(merged, tmp_path)
    files = sorted(out.glob("model-*.safetensors"))
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size - 8)
    index = json.loads((out / SAFE_INDEX).read_text())
    moved = next(k for k, v in index["weight_map"].items() if v == files[2].name)
    index["weight_map"][moved] = files[3].name
    (out / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(VerifyError) as info:
        verify_checkpoint(out)
    assert "truncated" in str(info.value) and f"the index says {files[3].name}" in str(info.value)


def rewrite_tensor(out: Path, key: str, change) -> None:
    """``key`` replaced by ``change(tensor)`` in its file, the file's metadata and the index's total_size kept right."""
    from safetensors.torch import load_file, save_file

    path = locate(out, key)[0]
    tensors = load_file(path)
    old = tensors[key].nbytes
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata=read_header(path)[0])
    index = json.loads((out / SAFE_INDEX).read_text())
    index["metadata"]["total_size"] += tensors[key].nbytes - old
    (out / SAFE_INDEX).write_text(json.dumps(index))


def test_a_verify_sample_reaches_the_last_layer(merged, tmp_path):
    """A sample of the merged tensors spans the layers: an export whose last layer was merged wrong fails with
    two tensors recomputed (before, the sample was the first ones in name order: layer 0 only)."""
    out = tampered(merged, tmp_path)
    targeted = [k for k in sorted(ModelDir(out).keys()) if k.startswith("model.layers.") and "proj" in k]
    last = max(targeted, key=lambda k: (int(k.split(".")[2]), k))
    rewrite_tensor(out, last, lambda t: t * (1 + 1e-3))
    report_of_the_good_one = verify_checkpoint(merged["out"], merged["base"], merged["adapter"], sample=2)
    assert report_of_the_good_one.recomputed[0].startswith("model.layers.0.")
    assert report_of_the_good_one.recomputed[-1].startswith("model.layers.1.")
    with pytest.raises(VerifyError, match=rf"{last}.*differs from base \+ adapter"):
        verify_checkpoint(out, merged["base"], merged["adapter"], sample=2)


def test_verify_catches_a_tensor_in_another_dtype(merged, tmp_path):
    """A norm of ones is the same values in bf16: only its dtype tells it is not what the export writes (every
    floating tensor in config.json's dtype, or each in its base's)."""
    out = tampered(merged, tmp_path)
    rewrite_tensor(out, "model.norm.weight", lambda t: t.to(torch.bfloat16))
    verify_checkpoint(out)  # files, index and values are all valid ...
    with pytest.raises(VerifyError, match=r"1 tensors are not in the dtype .*'model.norm.weight': bfloat16, not "
                                          r"float32 \(config.json declares float32\)"):
        verify_checkpoint(out, merged["base"])  # ... but not what an export of this base writes


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
@pytest.mark.parametrize("arch, dtype", [("deepseek_v3", "bfloat16"), ("deepseek_v3", "float16"),
                                         ("gpt_oss", "float16")])
def test_tensors_the_model_keeps_in_fp32_are_written_as_save_pretrained_writes_them(tiny_checkpoint, tmp_path, arch,
                                                                                    dtype):
    """transformers keeps a router's e_score_correction_bias (``_keep_in_fp32_modules_strict``: under bf16 and fp16)
    and gpt-oss's norms (``_keep_in_fp32_modules``: under fp16) in fp32: a merge in bf16/fp16 writes every tensor in
    the dtype ``from_pretrained(dtype=...).save_pretrained()`` writes it in, those not rounded (they were), and
    ``verify --base`` holds the same rule."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = Path(shutil.copytree(tiny_checkpoint(arch, hidden=32), tmp_path / "base"))
    kept = "e_score_correction_bias" if arch == "deepseek_v3" else "norm"
    tensors = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if kept in k]:  # values bf16 and fp16 round
        tensors[key] = 0.123456789 + 0.01 * torch.randn(tensors[key].shape, generator=generator)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    twin = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    twin.save_pretrained(tmp_path / "adapter")

    out = merge_offline(base, tmp_path / "adapter", tmp_path / "out", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).save_pretrained(tmp_path / "hf")
    ours, theirs = ModelDir(out), ModelDir(tmp_path / "hf")
    assert sorted(ours.keys()) == sorted(theirs.keys())
    assert {k: ours.dtype(k) for k in ours.keys()} == {k: theirs.dtype(k) for k in theirs.keys()}
    for key in (k for k in ours.keys() if "o_proj" not in k):
        assert torch.equal(ours.read(key), theirs.read(key)), key
    fp32 = sorted(k for k in ours.keys() if ours.dtype(k) == "F32")
    assert fp32 and all(kept in k for k in fp32)
    assert all(torch.equal(ours.read(k), tensors[k]) for k in fp32)

    verify_checkpoint(out, base, tmp_path / "adapter")
    outputs = load_file(out / "model.safetensors")
    outputs[fp32[0]] = outputs[fp32[0]].to(torch_dtype)  # what the export wrote before
    save_file(outputs, out / "model.safetensors", metadata=read_header(out / "model.safetensors")[0])
    with pytest.raises(VerifyError, match=rf"1 tensors are not in the dtype .*'{fp32[0]}': {dtype}, not float32"):
        verify_checkpoint(out, base, tmp_path / "adapter")


def test_verify_catches_a_config_that_is_not_the_bases(merged, tmp_path):
    """The config decides how the weights load (a tied head reads the embedding instead of the merged lm_head):
    it must be the base's but for the dtype. One written out again by transformers (its defaults spelled out or
    left implicit) is the same config."""
    from transformers import AutoConfig

    out = tampered(merged, tmp_path)
    AutoConfig.from_pretrained(out).save_pretrained(out)
    verify_checkpoint(out, merged["base"], merged["adapter"])
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = not config.get("tie_word_embeddings", False)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerifyError, match="config.json differs from the base's in tie_word_embeddings"):
        verify_checkpoint(out, merged["base"], merged["adapter"])


def test_verify_catches_an_export_without_tensors_and_files_from_two_exports(merged, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(merged["out"] / "config.json", empty / "config.json")
    (empty / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {}}))
    with pytest.raises(VerifyError, match="holds no tensors"):
        verify_checkpoint(empty)
    # One file of another export: its metadata (how it was merged) is not the others'.
    out = tampered(merged, tmp_path)
    path = locate(out, "model.norm.weight")[0]
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={**read_header(path)[0], "lora_dist_merged_base_dtype": "bfloat16"})
    with pytest.raises(VerifyError, match=rf"{path.name} and .* differ in their metadata lora_dist_merged_base_dtype"):
        verify_checkpoint(out)


def test_verify_against_the_wrong_base(bases, merged):
    with pytest.raises(VerifyError, match="base tensors are missing"):
        verify_checkpoint(merged["out"], bases["gpt2"])


# ----------------------------------------------------------------------------- the commands


def cli(argv: list[str]) -> int:
    """``lora-dist ARGV`` in this process; its exit code."""
    return main(argv)


def test_cli_merge_and_verify(merged, tmp_path, capsys):
    base, adapter, out = str(merged["base"]), str(merged["adapter"]), str(tmp_path / "out")
    assert cli(["merge", "--base", base, "--adapter", adapter, "--out", out, "--max-shard-size", "200KB",
                "--dtype", "bf16"]) == 0
    assert cli(["verify", out, "--base", base, "--adapter", adapter]) == 0
    assert "OK" in capsys.readouterr().out

    assert cli(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 2  # bad input: one line, exit 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["merge", "--base", base, "--adapter", adapter, "--out", out, "--overwrite"]) == 0

    (tmp_path / "out" / "config.json").unlink()
    assert cli(["verify", out]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.dist
def test_offline_merge_under_torchrun_splits_the_writing(merged, tmp_path):
    out = tmp_path / "out"
    ranks(2, str(SCRIPTS / "export_merge_offline.py"), str(tmp_path), "merge", "--base", str(merged["base"]),
          "--adapter", str(merged["adapter"]), "--out", str(out), "--max-shard-size", "100KB")
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [0, 0]
    assert all(r["bytes"] > 0 for r in results)  # both ranks wrote
    assert sum(r["bytes"] for r in results) == json.loads((out / SAFE_INDEX).read_text())["metadata"]["total_size"]
    for name in sorted(p.name for p in merged["out"].iterdir()):
        assert (out / name).read_bytes() == (merged["out"] / name).read_bytes(), name


@pytest.mark.dist
def test_the_ranks_wait_for_a_final_fsync_longer_than_the_groups_timeout(merged, tmp_path):
    """Each rank ends with an fsync of what it wrote (rank 0: all of it on node-local disks), minutes for a
    large model; the others wait for it, not parallel.timeout_s (before: a gloo timeout after it)."""
    out = tmp_path / "out"
    ranks(2, str(SCRIPTS / "export_slow_sync.py"), str(tmp_path), "merge", "--base", str(merged["base"]),
          "--adapter", str(merged["adapter"]), "--out", str(out), "--max-shard-size", "100KB")  # both exit 0
    for name in sorted(p.name for p in merged["out"].iterdir()):
        assert (out / name).read_bytes() == (merged["out"] / name).read_bytes(), name



def _two_piece_layout(tmp_path: Path):
    """A one-tensor checkpoint file (8 fp32 values) created as the export creates it, and its layout."""
    from lora_dist.export import layout as st

    layout = st.plan_layout([st.TensorSpec("w", torch.float32, (8,))], "1GB", {})
    st.create_file(tmp_path / layout.files[0].name, layout.files[0])
    return layout


def test_a_piece_is_written_behind_while_the_next_one_is_produced(tmp_path, monkeypatch):
    """The export writes a piece on a thread of its own while the rank reads and merges the next one: here the first
    write cannot finish until the rank has gone on to the next piece (written in turn, this would wait out the 10 s
    and fail). Both pieces land where they belong, and no writer thread is left."""
    import threading

    from lora_dist.export import layout as st
    from lora_dist.export.writer import _OpenFiles
    from safetensors.torch import load_file

    layout = _two_piece_layout(tmp_path)
    write, went_on, writes = st.pwrite_tensor, threading.Event(), []

    def slow_first_write(fd, data, offset):
        if not writes:
            assert went_on.wait(10), "the rank waited for the first piece's write before producing the next"
        writes.append(threading.current_thread().name)
        write(fd, data, offset)

    monkeypatch.setattr(st, "pwrite_tensor", slow_first_write)
    files = _OpenFiles(tmp_path, layout, budget=32)  # both 16-byte pieces fit
    files.make_room(16)
    files.write("w", 0, torch.arange(4.0))
    files.make_room(16)
    went_on.set()  # the next piece is being produced: the first write may finish
    files.write("w", 4, torch.arange(4.0, 8.0))
    assert files.close() is None
    assert torch.equal(load_file(str(tmp_path / layout.files[0].name))["w"], torch.arange(8.0))
    assert len(writes) == 2 and all(name != threading.current_thread().name for name in writes)
    assert not [t for t in threading.enumerate() if t.name.startswith("lora_dist-export-write")]


def test_two_pieces_that_do_not_fit_the_budget_are_written_in_turn(tmp_path, monkeypatch):
    """The piece in flight and the next one hold at most the rank's largest piece (what writing in turn holds): where
    both do not fit, the rank waits for the write before producing the next piece, so writing behind never raises
    the export's peak (the bench's 112M export held one 98 MB piece more before this rule). The piece written is
    freed by then too: the executor never holds a piece (it keeps a job's arguments past the job, which had two
    98 MB pieces live at once now and then)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lora_dist.bench.measure import LiveTensorBytes
    from lora_dist.export import layout as st
    from lora_dist.export.writer import _OpenFiles

    layout = _two_piece_layout(tmp_path)
    write, writes, release, submitted = st.pwrite_tensor, [], threading.Event(), []

    def gated_write(fd, data, offset):
        assert release.wait(10)
        writes.append(offset)
        write(fd, data, offset)

    def spy(executor, fn, *args):
        submitted.append(args)
        return submit(executor, fn, *args)

    submit = ThreadPoolExecutor.submit
    monkeypatch.setattr(st, "pwrite_tensor", gated_write)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", spy)
    files = _OpenFiles(tmp_path, layout, budget=16)  # one 16-byte piece at a time
    tracker = LiveTensorBytes("cpu")
    with tracker:
        files.make_room(16)
        files.write("w", 0, torch.arange(4.0))
        assert not writes and tracker.live == tracker.start + 16  # the piece, held by the write in flight
        release.set()
        files.make_room(16)
        # the first piece written, and freed, before the second is produced
        assert len(writes) == 1 and tracker.live == tracker.start
        files.write("w", 4, torch.arange(4.0, 8.0))
    assert files.close() is None and len(writes) == 2
    # the writer's jobs held no piece: a holder the write emptied, the file, the offset
    assert [[type(a) for a in args] for args in submitted] == [[list, int, int]] * 2
    assert not any(holder for holder, _, _ in submitted)


def test_a_failed_write_behind_is_raised_before_the_next_piece_and_by_close(tmp_path, monkeypatch):
    """A write that fails on the writer thread (the disk full) is not lost: making room for the next piece raises
    it, so the rank stops producing, and close returns it after closing every file."""
    import errno

    from lora_dist.export import layout as st
    from lora_dist.export.writer import _OpenFiles

    layout = _two_piece_layout(tmp_path)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "pwrite_tensor", full)
    files = _OpenFiles(tmp_path, layout, budget=16)
    files.write("w", 0, torch.arange(4.0))
    with pytest.raises(OSError, match="No space left"):
        files.make_room(16)
    files.write("w", 4, torch.arange(4.0, 8.0))  # a rank that went on regardless: its error is close's
    error = files.close()
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and not files.fds


def test_writing_behind_holds_no_more_than_the_largest_piece(tiny_checkpoint, tmp_path):
    """An offline merge of a model whose embedding and head (copied from the base, one after the other in the
    layout) are its largest tensors: the live tensors peak at about one of them, as when pieces were written in
    turn, not two (writing the head behind while the embedding is read). The merged pieces between, small, are
    still written behind."""
    from lora_dist.bench.measure import LiveTensorBytes

    base = tiny_checkpoint("llama", hidden=64, vocab=16384)  # embedding and head: 4 MB each in fp32
    adapter = peft_adapter(base, "llama", tmp_path / "adapter")
    largest = 16384 * 64 * 4
    tracker = LiveTensorBytes("cpu")
    with tracker:
        merge_offline(base, adapter, tmp_path / "out")
    assert largest <= tracker.peak - tracker.start < 1.5 * largest, (tracker.peak - tracker.start, largest)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_failed_or_interrupted_merge_leaves_nothing_open_and_syncs_nothing(merged, tmp_path, monkeypatch, stop):
    """Ctrl-C (or a failed collective) while the pieces are written goes through at once; an error producing a
    piece fails the export. Either way the writes in flight are waited for, every staged file is closed without
    an fsync (the staging dir is removed anyway; an fsync of a large partial export on a network filesystem could
    take minutes), no file descriptor or writer thread is left, and nothing is published."""
    import os
    import threading

    from lora_dist.export import sources

    def failing(*args, **kwargs):
        raise stop("stopped while merging")

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(sources, "merge_flat", failing)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    out, open_fds = tmp_path / "out", len(os.listdir("/proc/self/fd"))
    with pytest.raises(stop, match="stopped while merging"):
        merge_offline(merged["base"], merged["adapter"], out, max_shard_size="100KB")
    assert not synced and not out.exists() and not list(tmp_path.iterdir())
    assert len(os.listdir("/proc/self/fd")) == open_fds
    assert not [t for t in threading.enumerate() if t.name.startswith("lora_dist-export-write")]


def test_a_failed_close_is_the_exports_error_and_every_file_is_closed(tmp_path, monkeypatch):
    """A network filesystem reports a failed write when the file is closed: that error is close's, not raised
    past it (the other ranks would wait for this one), and the other files are closed all the same."""
    import errno
    import os

    from lora_dist.export import layout as st
    from lora_dist.export.writer import _OpenFiles

    specs = [st.TensorSpec(name, torch.float32, (4,)) for name in ("a", "b")]
    layout = st.plan_layout(specs, 16, {})  # one tensor a file
    for shard in layout.files:
        st.create_file(tmp_path / shard.name, shard)
    files = _OpenFiles(tmp_path, layout, budget=16)
    for name in ("a", "b"):
        files.write(name, 0, torch.ones(4))
    close, closed = os.close, []

    def failing_close(fd):
        close(fd)
        closed.append(fd)
        if len(closed) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", failing_close)
    error = files.close()
    assert isinstance(error, OSError) and error.errno == errno.EIO and len(closed) == 2 and not files.fds
