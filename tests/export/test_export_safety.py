"""Issue 15 ("Nothing lost, ever"): what the merge, the export and verify may write, and what they must refuse.

Each test uses the issue's own inputs. "Nothing lost" is checked by hashing every
file (hidden ones included) under the user's folder before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from dist_scripts.export_common import build_lora_model
from distutil import REPO, lora_dist, ranks
from safetensors.torch import load_file, save_file

from lora_dist.adapter import save_adapter
from lora_dist.cli import main
from lora_dist.config import config_to_dict, load_config
from lora_dist.demo import write_demo_data
from lora_dist.export import (
    ExportError,
    ExportOverflowError,
    OutputRefusedError,
    VerifyError,
    export_merged,
    is_merged_export,
    merge_offline,
    verify_checkpoint,
)
from lora_dist.lora import LoRAConfig, inject_lora, lora_modules
from lora_dist.model_dir import SAFE_INDEX, SAFE_SINGLE

V_PROJ = "model.layers.0.self_attn.v_proj.weight"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) with the sha256 of each file."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``lora-dist ARGV`` in this process: the exit code and the last line of stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def one_line(code: int, line: str, command: str, *needles: str) -> None:
    assert code == 2, line
    assert line.startswith(f"lora-dist {command}: error: "), line
    for needle in needles:
        assert needle in line, line


def make_adapter(base: Path, out: Path, targets=("q_proj", "v_proj")) -> Path:
    """A lora_dist adapter with random A and B on ``targets`` (r=4, alpha=8)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    return save_adapter(model, out, str(base))


def edit_tensors(path: Path, edit) -> None:
    """Rewrite a safetensors file with ``edit(tensors)`` applied, keeping its metadata."""
    from lora_dist.safetensors_file import read_header

    metadata = read_header(path)[0]
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture
def folder(base, tmp_path) -> Path:
    """The issue's P: P/base, P/adapter and a file of the user's own."""
    p = tmp_path / "P"
    shutil.copytree(base, p / "base")
    make_adapter(p / "base", p / "adapter")
    (p / "notes.txt").write_text("mine\n")
    return p


# ----------------------------------------------------------------------------- item 3: never an input


def test_merge_into_a_folder_holding_its_inputs_deletes_nothing(folder, capsys):
    """`merge --base P/base --adapter P/adapter --out P --overwrite` deleted the base, the adapter and P/notes.txt."""
    p = folder
    before = snapshot(p)
    merge = ["merge", "--base", p / "base", "--adapter", p / "adapter"]
    one_line(*cli(capsys, *merge, "--out", p, "--overwrite"), "merge", "contains the input", "outside every input")
    one_line(*cli(capsys, *merge, "--out", p, "--overwrite"), "merge", "contains the input", "outside every input")
    one_line(*cli(capsys, *merge, "--out", p / "adapter", "--overwrite"), "merge", "is the input")
    one_line(*cli(capsys, *merge, "--out", p / "base", "--overwrite"), "merge", "is the input")
    one_line(*cli(capsys, *merge, "--out", p / "base" / "merged"), "merge", "is inside the input")
    one_line(*cli(capsys, *merge, "--out", p / "adapter" / "merged", "--overwrite"), "merge", "is inside")
    os.symlink(p / "base", p.parent / "link-to-base")
    one_line(*cli(capsys, *merge, "--out", p.parent / "link-to-base", "--overwrite"), "merge", "is the input")
    assert snapshot(p) == before


def test_overwrite_replaces_only_a_merged_export_lora_dist_wrote(folder, tiny_checkpoint, capsys):
    p = folder
    merge = ["merge", "--base", p / "base", "--adapter", p / "adapter"]
    (p / "mine").mkdir()
    (p / "mine" / "important.txt").write_text("keep me\n")
    shutil.copytree(tiny_checkpoint("llama", seed=7), p / "other_model")
    assert cli(capsys, *merge, "--out", p / "merged")[0] == 0
    assert is_merged_export(p / "merged") and not is_merged_export(p / "other_model")
    os.symlink(p / "merged", p / "link")
    before = snapshot(p)

    one_line(*cli(capsys, *merge, "--out", p / "mine", "--overwrite"), "merge",
             "important.txt, which lora_dist does not write", "move it away or choose another --out")
    one_line(*cli(capsys, *merge, "--out", p / "other_model", "--overwrite"), "merge",
             "is a model dir lora_dist did not write", "no lora_dist metadata")
    one_line(*cli(capsys, *merge, "--out", p / "notes.txt", "--overwrite"), "merge", "is a file")
    one_line(*cli(capsys, *merge, "--out", p / "notes.txt" / "merged"), "merge", "which is a file, not a directory")
    one_line(*cli(capsys, *merge, "--out", p / "link", "--overwrite"), "merge", "symlink")
    one_line(*cli(capsys, *merge, "--out", p / "merged"), "merge", "already exists", "--overwrite")
    assert snapshot(p) == before

    (p / "merged" / "README-mine.md").write_text("my notes on this export\n")  # the user's file inside an export
    before = snapshot(p)
    one_line(*cli(capsys, *merge, "--out", p / "merged", "--overwrite"), "merge", "README-mine.md")
    assert snapshot(p) == before

    (p / "merged" / "README-mine.md").unlink()
    assert cli(capsys, *merge, "--out", p / "merged", "--overwrite", "--dtype", "bf16")[0] == 0  # ours: replaced
    assert load_file(str(p / "merged" / SAFE_SINGLE))[V_PROJ].dtype == torch.bfloat16
    (p / "empty").mkdir()
    assert cli(capsys, *merge, "--out", p / "empty", "--overwrite")[0] == 0  # nothing to lose
    assert sorted(x.name for x in p.iterdir() if x.name.startswith(".")) == []  # no staging or set-aside dirs


def test_named_chat_templates_are_copied_and_replaced_like_the_other_files(folder, capsys):
    """transformers saves a tokenizer's named chat templates in additional_chat_templates/*.jinja: the export
    copies them, an export holding them is still one lora_dist wrote, and a user's file there is refused."""
    from transformers import AutoTokenizer

    p = folder
    tokenizer = AutoTokenizer.from_pretrained(p / "base")
    tokenizer.chat_template = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ tools }}"}
    tokenizer.save_pretrained(p / "base")
    templates = p / "base" / "additional_chat_templates"
    assert [x.name for x in templates.iterdir()] == ["tool_use.jinja"]
    merge = ["merge", "--base", p / "base", "--adapter", p / "adapter"]
    assert cli(capsys, *merge, "--out", p / "merged")[0] == 0
    copied = p / "merged" / "additional_chat_templates" / "tool_use.jinja"
    assert copied.read_text() == (templates / "tool_use.jinja").read_text()
    assert AutoTokenizer.from_pretrained(p / "merged").chat_template == tokenizer.chat_template
    assert is_merged_export(p / "merged")
    assert cli(capsys, *merge, "--out", p / "merged", "--overwrite")[0] == 0  # ours, templates and all: replaced
    assert copied.is_file()

    (copied.parent / "mine.jinja").write_text("{{ my template }}\n")  # the user's file in that subdir
    before = snapshot(p)
    one_line(*cli(capsys, *merge, "--out", p / "merged", "--overwrite"), "merge",
             "additional_chat_templates/mine.jinja, which lora_dist does not write")
    assert snapshot(p) == before


def test_end_of_training_export_keeps_a_users_merged_folder(base, tmp_path):
    """export_merged at the end of training writes <run>/merged: a folder of the user's there is refused."""
    model = build_lora_model(base, "llama")
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "important.txt").write_text("keep me\n")
    own_base = Path(shutil.copytree(base, tmp_path / "P" / "base"))
    before = snapshot(tmp_path)
    with pytest.raises(OutputRefusedError, match="important.txt"):
        export_merged(model, run / "merged", own_base, overwrite=True)
    with pytest.raises(OutputRefusedError, match="contains the input"):
        export_merged(model, tmp_path / "P", own_base, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.fixture
def run_dir(folder) -> Path:
    """A finished single-process run under P: config.json and adapter/ (no training needed to export it)."""
    run = folder / "run"
    cfg = load_config(None, [f"model.path={folder / 'base'}", f"output.dir={run}", "lora.r=4", "lora.alpha=8",
                             "lora.target_modules=[q_proj,v_proj]", "parallel.strategy=none",
                             "export.dtype=float32"])
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    shutil.copytree(folder / "adapter", run / "adapter")
    (run / "checkpoints").mkdir()
    return run


def test_export_of_a_run_never_touches_its_inputs(run_dir):
    p = run_dir.parent
    before = snapshot(p)
    for out, needle in ((run_dir, "contains the input"), (run_dir / "adapter", "is the input"),
                        (run_dir / "checkpoints" / "x", "is inside the input"), (p / "base", "is the input"),
                        (p, "contains the input"), (p / "notes.txt", "is a file")):
        proc = lora_dist("export", str(run_dir), "--out", str(out), "--overwrite", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert last.startswith("lora-dist export: error: ") and needle in last, last
    assert snapshot(p) == before
    lora_dist("export", str(run_dir))  # RUN_DIR/merged
    lora_dist("export", str(run_dir), "--overwrite")  # and again: the export it wrote is replaced
    assert is_merged_export(run_dir / "merged")
    assert snapshot(p) == {**before, **{k: v for k, v in snapshot(p).items() if k.startswith("run/merged")}}


# ----------------------------------------------------------------------------- item 4: finite after the cast


@pytest.fixture(scope="module")
def near_limit(base, tmp_path_factory) -> dict[str, Path]:
    """A base whose v_proj[0, 0] is 60000 (fits fp16) and an adapter adding +10000 there: 70000 overflows fp16."""
    root = tmp_path_factory.mktemp("overflow")
    big = Path(shutil.copytree(base, root / "base"))
    edit_tensors(big / SAFE_SINGLE, lambda t: t[V_PROJ].__setitem__((0, 0), 60000.0))
    adapter = make_adapter(big, root / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    a_key = next(k for k in weights if "layers.0.self_attn.v_proj.lora_A" in k)
    b_key = next(k for k in weights if "layers.0.self_attn.v_proj.lora_B" in k)
    weights[a_key].zero_()
    weights[b_key].zero_()
    weights[a_key][0, 0], weights[b_key][0, 0] = 100.0, 50.0  # scale 2: +10000 at [0, 0]
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"base": big, "adapter": adapter, "root": root}


def test_fp16_merge_that_overflows_is_refused_and_publishes_nothing(near_limit, tmp_path, capsys):
    base, adapter, out = near_limit["base"], near_limit["adapter"], tmp_path / "merged"
    merge = ["merge", "--base", base, "--adapter", adapter, "--out", out]
    one_line(*cli(capsys, *merge, "--dtype", "float16"), "merge", V_PROJ, "overflow float16", "70000",
             "--dtype bfloat16", "float32", "export.dtype=bfloat16")
    assert list(tmp_path.iterdir()) == []  # no output dir, no staging dir
    assert cli(capsys, *merge, "--dtype", "bfloat16")[0] == 0  # what the message suggests works
    assert cli(capsys, "verify", out, "--base", base, "--adapter", adapter, "--sample", "-1")[0] == 0
    assert load_file(str(out / SAFE_SINGLE))[V_PROJ][0, 0].item() == pytest.approx(70000, rel=1e-2)


def test_fp16_export_from_the_model_that_overflows_is_refused(near_limit, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter

    model = AutoModelForCausalLM.from_pretrained(near_limit["base"], dtype=torch.float32)
    load_adapter(model, near_limit["adapter"])
    with pytest.raises(ExportOverflowError, match=rf"{V_PROJ}.*overflow float16"):
        export_merged(model, tmp_path / "merged", near_limit["base"], dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


def test_a_copied_tensor_that_overflows_the_dtype_is_refused_too(base, tmp_path):
    big = Path(shutil.copytree(base, tmp_path / "base"))
    edit_tensors(big / SAFE_SINGLE, lambda t: t["model.norm.weight"].__setitem__(3, -1e5))
    make_adapter(big, tmp_path / "adapter")
    with pytest.raises(ExportOverflowError, match=r"model.norm.weight: 1 value\(s\) up to 100000 overflow float16"):
        merge_offline(big, tmp_path / "adapter", tmp_path / "merged", dtype="fp16")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp-*"))


@pytest.fixture(scope="module")
def fp16_run(tiny_checkpoint, tmp_path_factory) -> dict:
    """`lora-dist train ... export.merged=true export.dtype=float16` on a base holding 70000 in a LoRA target."""
    root = tmp_path_factory.mktemp("fp16run")
    big = Path(shutil.copytree(tiny_checkpoint("llama", hidden=64, layers=2), root / "base"))
    edit_tensors(big / SAFE_SINGLE, lambda t: t[V_PROJ].__setitem__((0, 0), 70000.0))
    data = write_demo_data(root / "data.jsonl", n=100)
    run = root / "run"
    proc = lora_dist("train", f"model.path={big}", f"data.path={data}", f"output.dir={run}", "parallel.strategy=none",
                     "train.steps=2", "train.seq_len=32", "lora.target_modules=[q_proj,v_proj]",
                     "export.merged=true", "export.dtype=float16", check=False)
    return {"proc": proc, "run": run, "base": big}


def test_train_with_an_fp16_export_that_overflows_fails_in_one_line(fp16_run):
    proc, run = fp16_run["proc"], fp16_run["run"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lora-dist train: error: ") and V_PROJ in last and "overflow float16" in last, last
    assert "export.dtype=bfloat16" in last, last
    assert not (run / "merged").exists() and not list(run.glob(".merged.tmp-*"))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the training is not lost


def test_a_failed_merged_export_keeps_the_adapter_that_was_not_asked_for(fp16_run, tmp_path):
    """``export.adapter=false``: the merged export was the only output, and its failure lost the whole training.
    The adapter is written anyway, saying so, and ``lora-dist export RUN_DIR`` exports it."""
    base, run = fp16_run["base"], tmp_path / "run"
    data = write_demo_data(tmp_path / "data.jsonl", n=100)
    proc = lora_dist("train", f"model.path={base}", f"data.path={data}", f"output.dir={run}", "parallel.strategy=none",
                     "train.steps=2", "train.seq_len=32", "lora.target_modules=[q_proj,v_proj]", "export.adapter=false",
                     "export.merged=true", "export.dtype=float16", check=False)
    assert proc.returncode == 2 and "overflow float16" in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert "the trained LoRA is kept in" in proc.stderr and not (run / "merged").exists()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    lora_dist("export", str(run), "--dtype", "bfloat16")
    lora_dist("verify", str(run / "merged"), "--base", str(base), "--adapter", str(run / "adapter"))


@pytest.mark.dist
def test_sharded_export_that_overflows_fails_on_every_rank(fp16_run):
    run = fp16_run["run"]
    proc = ranks(2, "-m", "lora_dist.cli", "export", str(run), "--dtype", "float16", check=False)
    assert proc.returncode != 0
    assert f"lora-dist export: error: {V_PROJ}" in proc.stderr and "overflow float16" in proc.stderr, proc.stderr[-3000:]
    assert str(REPO / "lora_dist") not in proc.stderr, proc.stderr[-3000:]  # no traceback from lora_dist
    assert not (run / "merged").exists() and not list(run.glob(".merged.tmp-*"))
    ranks(2, "-m", "lora_dist.cli", "export", str(run), "--dtype", "bfloat16")
    lora_dist("verify", str(run / "merged"), "--base", str(fp16_run["base"]), "--adapter", str(run / "adapter"))


# ----------------------------------------------------------------------------- item 6: verify means what it says


@pytest.fixture(scope="module")
def merged(base, tmp_path_factory) -> dict[str, Path]:
    """An offline merge with LoRA on q_proj and v_proj only: k_proj, o_proj, the MLP and the norms are untouched."""
    root = tmp_path_factory.mktemp("verify")
    adapter = make_adapter(base, root / "adapter")
    return {"base": base, "adapter": adapter, "out": merge_offline(base, adapter, root / "out")}


def plus_ten(merged: dict[str, Path], dst: Path, key: str) -> Path:
    out = Path(shutil.copytree(merged["out"], dst))
    edit_tensors(out / SAFE_SINGLE, lambda t: t[key].add_(10))
    return out


def test_a_non_lora_tensor_changed_by_ten_fails_verify_by_default(merged, tmp_path, capsys):
    key = "model.layers.1.self_attn.k_proj.weight"  # not a LoRA target; the sample of 8 used to skip it
    out = plus_ten(merged, tmp_path / "out", key)
    capsys.readouterr()
    assert main(["verify", str(out), "--base", str(merged["base"]), "--adapter", str(merged["adapter"])]) == 1
    err = capsys.readouterr().err
    assert f"'{key}' differs from the base (max |diff| 10)" in err
    with pytest.raises(VerifyError, match=key):
        verify_checkpoint(out, merged["base"], merged["adapter"], sample=0)


def test_without_the_adapter_the_base_is_still_compared(merged, tmp_path, capsys):
    base = str(merged["base"])
    report = verify_checkpoint(merged["out"], base)
    lora = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    assert set(report.unchecked) == lora and report.untouched == report.tensors - 4
    assert "4 2-D weights differ from it" in report.summary() and "NOT checked without --adapter" in report.summary()

    norm = plus_ten(merged, tmp_path / "a", "model.norm.weight")  # a 1-D tensor: no merge changes it
    capsys.readouterr()
    assert main(["verify", str(norm), "--base", base]) == 1
    assert "'model.norm.weight' differs from the base (max |diff| 10)" in capsys.readouterr().err

    k_proj = plus_ten(merged, tmp_path / "b", "model.layers.1.self_attn.k_proj.weight")  # could be a merge: said so
    report = verify_checkpoint(k_proj, base)
    assert "model.layers.1.self_attn.k_proj.weight" in report.unchecked and len(report.unchecked) == 5


def test_verify_summary_says_what_was_checked(merged, capsys):
    base, adapter, out = str(merged["base"]), str(merged["adapter"]), str(merged["out"])
    before = [snapshot(merged[k].parent) for k in ("base", "out")]
    capsys.readouterr()
    assert main(["verify", out, "--base", base, "--adapter", adapter, "--sample", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert [snapshot(merged[k].parent) for k in ("base", "out")] == before  # verify writes nothing
    n = len(load_file(str(merged["out"] / SAFE_SINGLE)))
    assert f"all {n - 4} tensors the adapter does not touch are bit-exact with the base" in line, line
    assert "2 of 4 LoRA-merged tensors recomputed from base + adapter (--sample -1 recomputes all)" in line, line
    assert main(["verify", out]) == 0
    assert "not compared with a base" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "how many of the LoRA-merged tensors to recompute" in help_text
    assert "EVERY tensor the merge does not touch is bit-exact" in help_text


def test_an_index_pointing_outside_the_dir_fails(merged, tmp_path, capsys):
    """An index naming ../other/model.safetensors, with no weight file in the dir, passed verify."""
    other, ckpt = tmp_path / "other", tmp_path / "ckpt"
    other.mkdir()
    ckpt.mkdir()
    shutil.copy(merged["out"] / SAFE_SINGLE, other / SAFE_SINGLE)
    shutil.copy(merged["out"] / "config.json", ckpt / "config.json")
    keys = list(load_file(str(other / SAFE_SINGLE)))
    size = sum(t.nbytes for t in load_file(str(other / SAFE_SINGLE)).values())
    (ckpt / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                               "weight_map": {k: "../other/model.safetensors" for k in keys}}))
    capsys.readouterr()
    assert main(["verify", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "'../other/model.safetensors', not a file in" in err and "inside the checkpoint dir" in err, err


# ----------------------------------------------------------------------------- item 10: a read-only filesystem


@pytest.fixture
def read_only_disk(small_disk):
    """A 16 MB tmpfs that can be remounted read-only; yields (mountpoint, remount_ro)."""
    mnt = small_disk(16 * 1024)

    def remount_ro() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)

    return mnt, remount_ro


def test_merge_onto_a_read_only_filesystem_is_one_line(merged, read_only_disk, capsys):
    """chmod 0555 does not stop root; a read-only mount does (EROFS): one line, exit 2, the old export kept."""
    mnt, remount_ro = read_only_disk
    merge = ["merge", "--base", merged["base"], "--adapter", merged["adapter"]]
    assert cli(capsys, *merge, "--out", mnt / "old")[0] == 0
    remount_ro()
    before = snapshot(mnt)
    one_line(*cli(capsys, *merge, "--out", mnt / "new"), "merge", "Read-only file system", "writable filesystem")
    one_line(*cli(capsys, *merge, "--out", mnt / "old", "--overwrite"), "merge", "Read-only file system")
    one_line(*cli(capsys, *merge, "--out", mnt / "sub" / "new"), "merge", "Read-only file system")
    assert snapshot(mnt) == before
    with pytest.raises(ExportError, match="Read-only file system"):
        export_merged(build_lora_model(merged["base"], "llama"), mnt / "new", merged["base"])


def test_the_finite_check_holds_no_copy_of_the_piece_and_finds_every_nan_and_inf():
    """Every piece written is checked finite in its dtype; the check must not hold another copy of the piece
    (``isfinite`` of a whole fp32 tensor allocates a temporary as large as it: the export's peak grew by one
    largest tensor). A min/max reduction holds two numbers whatever the piece's size, and still finds a NaN or
    an Inf wherever it is, in every dtype written."""
    from lora_dist.bench.measure import LiveTensorBytes
    from lora_dist.export.errors import ExportOverflowError
    from lora_dist.export.sources import to_output

    piece = torch.randn(1 << 24)  # 64 MB
    tracker = LiveTensorBytes("cpu")
    with tracker:
        assert to_output(piece, torch.float32, "w") is piece  # the same dtype: no copy either
    assert tracker.peak - tracker.start <= 4096, tracker.peak - tracker.start
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 33, 4099):  # past the vectorized loops' widths, and their tails
            values = torch.randn(n)
            assert torch.equal(to_output(values, dtype, "w"), values.to(dtype))
            for where in {0, n // 2, n - 1}:
                for bad in (float("nan"), float("inf"), -float("inf")):
                    corrupt = values.clone()
                    corrupt[where] = bad
                    with pytest.raises(ExportOverflowError, match="NaN/Inf"):
                        to_output(corrupt, dtype, "w")
