"""Bad input: one clear line naming the problem and the fix, no traceback, nothing half-written."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from distutil import REPO, alias_bomb, lora_dist
from lora_dist.demo import write_demo_data


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(root / "data.jsonl", n=100)
    return {"root": root, "base": base, "data": data}


def _train(good, out: Path, *overrides: str):
    args = ["train", f"model.path={good['base']}", f"data.path={good['data']}", f"output.dir={out}",
            "parallel.strategy=none", "train.steps=2", "train.seq_len=32", *overrides]
    return lora_dist(*args, check=False)


def _one_line_error(proc, *needles: str, command: str = "train") -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lora-dist {command}: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


def _copy_base(good, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(good["base"]).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_model_path(good, tmp_path):
    proc = _train(good, tmp_path / "o", f"model.path={tmp_path / 'nope'}")
    _one_line_error(proc, "not a directory", "model.path")


@pytest.mark.parametrize("command", ["merge", "generate"])
@pytest.mark.parametrize("what", ["missing", "not-a-model"])
def test_a_bad_base_option_is_named_as_the_user_passed_it(good, tmp_path, command, what):
    """`lora-dist merge` and `generate` take the base as --base: an error names that, not the config's model.path."""
    base = tmp_path / "base"
    if what == "not-a-model":
        base.mkdir()
    rest = ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")] if command == "merge" else \
        ["--prompt", "hi"]
    last = _one_line_error(lora_dist(command, "--base", str(base), *rest, check=False), "--base", command=command)
    assert "model.path" not in last and ("not a directory" if what == "missing" else "no config.json") in last


def test_the_error_line_is_written_whole(tmp_path, monkeypatch):
    """Each rank writes its one-line error with its newline in one write: ranks sharing torchrun's terminal or a log
    file printed theirs in two (print writes the newline apart), and two ranks' lines ran together."""
    import sys

    from lora_dist.cli import EXIT_USAGE, main

    writes = []
    monkeypatch.setattr(sys, "stderr", type("Recorder", (), {"write": lambda self, s: writes.append(s),
                                                             "flush": lambda self: None})())
    assert main(["merge", "--base", str(tmp_path / "nope"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "o")]) == EXIT_USAGE
    lines = [w for w in writes if w.startswith("lora-dist merge: error: ")]
    assert len(lines) == 1 and lines[0].endswith("not a directory; set --base to a local HF checkpoint dir\n")


def test_export_of_a_dir_that_is_not_a_run_says_what_it_is(good, tmp_path):
    """`lora-dist export RUN_DIR` given a model dir (its config.json is a transformers config) says so and points to
    `lora-dist merge` (it said "a run config must be a mapping of sections", and printed the model's config)."""
    last = _one_line_error(lora_dist("export", str(good["base"]), check=False), "is a model checkpoint dir, not a "
                           "lora-dist output.dir", "lora-dist merge --base DIR --adapter", command="export")
    assert "model_type" not in last
    _one_line_error(lora_dist("export", str(tmp_path), check=False), "RUN_DIR must be a lora-dist output.dir",
                    command="export")
    assert not (Path(good["base"]) / "merged").exists()


def test_missing_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    (base / "model.safetensors").unlink()
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "no safetensors weights")


def test_pickled_weights_are_refused(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "never unpickles")


def test_corrupt_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "model.safetensors", "not a readable safetensors")


def test_truncated_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "model.safetensors")


def test_unknown_config_key_suggests_the_closest(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", "train.stpes=3"), "train.stpes", "train.steps")


def test_missing_config_file(good, tmp_path):
    proc = lora_dist("train", str(tmp_path / "missing.yaml"), check=False)
    _one_line_error(proc, "missing.yaml", "not found")


def test_missing_data_file(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", f"data.path={tmp_path / 'none.jsonl'}"), "data.path", "not found")


def test_empty_data_file(good, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(_train(good, tmp_path / "o", f"data.path={empty}"), "holds no records")


def test_malformed_data_line(good, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\n')
    _one_line_error(_train(good, tmp_path / "o", f"data.path={bad}"), "bad.jsonl:2")


def test_seq_len_beyond_model_positions(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", "train.seq_len=100000"), "train.seq_len=100000", "positions")


def test_output_dir_not_writable(good, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(_train(good, tmp_path / "x", f"output.dir={blocker / 'run'}"), "output.dir", "not writable")


def test_adapter_shapes_not_matching_the_base(good, tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    assert _train(good, out).returncode == 0
    other = tiny_checkpoint("llama", hidden=32, layers=2)
    proc = lora_dist("merge", "--base", str(other), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m"),
                     check=False)
    _one_line_error(proc, "does not match", "different base", command="merge")
    assert not (tmp_path / "m").exists()


def test_disk_full_during_export(good, tmp_path, small_disk):
    tiny_disk = small_disk(64)
    run = tmp_path / "run"
    assert _train(good, run, "export.merged=false").returncode == 0
    proc = lora_dist("export", str(run), "--out", str(tiny_disk / "merged"), check=False)
    _one_line_error(proc, "not enough space", "KB are free", "free space or choose another output dir", command="export")
    assert list(tiny_disk.iterdir()) == []  # nothing half-written left behind


def test_no_unpickling_anywhere_in_the_package():
    """Tensors are read with safetensors; a torch.load must say weights_only=True; no pickle module."""
    for path in (REPO / "lora_dist").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path


# Issue 15 (items 7, 9, 10): each input the probe found accepted silently or answered with a traceback.

def _refused(proc, *needles: str, command: str = "train", out: Path | None = None) -> str:
    last = _one_line_error(proc, *needles, command=command)
    assert len(last) < 700, last[:1000]
    if out is not None:
        assert not out.exists(), "a refused run wrote its output dir"
    return last


def test_yaml_alias_bomb_is_refused_at_once(good, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    args = [f"model.path={good['base']}", f"data.path={good['data']}", f"output.dir={tmp_path / 'o'}"]
    proc = lora_dist("train", str(bomb), *args, check=False, timeout=60)
    _refused(proc, "bomb.yaml: refused: more than 20000 values", out=tmp_path / "o")
    assert "lol" not in proc.stderr
    value = alias_bomb().split("target_modules: ", 1)[1].strip()
    proc = lora_dist("train", *args, f"lora.target_modules={value}", check=False, timeout=60)
    _refused(proc, "override 'lora.target_modules': refused", out=tmp_path / "o")


def test_huge_override_value_is_shown_truncated(good, tmp_path):
    proc = _train(good, tmp_path / "o", "train.steps=" + "x" * 100_000)
    assert "..." in _refused(proc, "train.steps must be an integer, got 'xxx", out=tmp_path / "o")


@pytest.mark.parametrize(
    "override, needle",
    [("train.min_lr_ratio=50", "train.min_lr_ratio must be <= 1.0, got 50.0"),
     ("train.lr=1e30", "train.lr must be <= 1.0"),
     ("lora.alpha_pattern={'(': 2}", "lora.alpha_pattern key '(' is not a valid regex"),
     # parsed only after training before: a ValueError traceback on every rank
     ("export.max_shard_size=5GBs", "export.max_shard_size='5GBs' is not a positive size")],
    ids=["min-lr-ratio", "lr", "alpha-pattern", "max-shard-size"],
)
def test_config_values_accepted_silently_before(good, tmp_path, override, needle):
    _refused(_train(good, tmp_path / "o", override), needle, out=tmp_path / "o")


@pytest.mark.parametrize("text, needle", [(None, "no such file"), ("{'stage': 3}", "is not valid JSON ("),
                                          ('{"bf16": {"enabled": true}}', 'turns "bf16" on, but model.dtype=float32')],
                         ids=["missing", "malformed", "dtype"])
def test_deepspeed_config_file_is_refused_before_any_work(good, tmp_path, text, needle):
    """Read only once the data was tokenized before: a FileNotFoundError / JSONDecodeError traceback; a bf16
    section that contradicted model.dtype and parallel.mixed_precision won silently."""
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    proc = _train(good, tmp_path / "o", "parallel.strategy=zero3", f"parallel.deepspeed_config={path}")
    _refused(proc, str(path), "parallel.deepspeed_config", needle, out=tmp_path / "o")
    assert " blocks of " not in proc.stderr  # refused before the data is tokenized


def test_non_utf8_yaml_and_data(good, tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("# réglages\ntrain:\n  steps: 2\n".encode("latin-1"))
    proc = lora_dist("train", str(cfg), f"model.path={good['base']}", f"data.path={good['data']}",
                     f"output.dir={tmp_path / 'o'}", check=False)
    _refused(proc, "latin1.yaml: the config file is not UTF-8 text (byte 0xe9 at line 1, column 4)", out=tmp_path / "o")
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(Path(good["data"]).read_bytes() + '{"text": "café"}\n'.encode("latin-1"))
    _refused(_train(good, tmp_path / "o", f"data.path={data}"), "latin1.jsonl: not UTF-8 text (byte 0xe9 at line 101",
             "convert the file to UTF-8")


@pytest.mark.parametrize(
    "config, needle",
    [(b"{not json", "config.json: the model config is not valid JSON"),
     (b'{"hidden_size": 64}', "config.json has no model_type"),
     (b'["llama"]', "must hold a JSON object")],
    ids=["not-json", "no-model-type", "list"],
)
def test_invalid_model_config_json(good, tmp_path, config, needle):
    base = _copy_base(good, tmp_path / "base")
    (base / "config.json").write_bytes(config)
    _refused(_train(good, tmp_path / "o", f"model.path={base}"), needle, out=tmp_path / "o")


def test_index_pointing_outside_the_model_dir(good, tmp_path):
    import json

    base = _copy_base(good, tmp_path / "base")
    (tmp_path / "other").mkdir()
    (base / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    keys = __import__("safetensors").safe_open(str(tmp_path / "other" / "model.safetensors"), "pt").keys()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "../other/model.safetensors" for k in keys}}))
    _refused(_train(good, tmp_path / "o", f"model.path={base}"), "names '../other/model.safetensors', which is "
             "outside the model dir", out=tmp_path / "o")


def _needs_remote_code(base: Path, tokenizer: bool) -> Path:
    """Make ``base`` name code in the dir that would create ``ran`` next to it if it ever ran."""
    import json

    marker = base.parent / "ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    if tokenizer:
        cfg = json.loads((base / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer",
                                                                                   None]})
        (base / "tokenizer_config.json").write_text(json.dumps(cfg))
        (base / "tokenization_custom.py").write_text(code)
    else:
        cfg = json.loads((base / "config.json").read_text())
        cfg.update(model_type="custom_llm", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
        (base / "config.json").write_text(json.dumps(cfg))
        (base / "configuration_custom.py").write_text(code)
        (base / "modeling_custom.py").write_text(code)
    return marker


@pytest.mark.parametrize("part", ["model", "tokenizer"])
def test_remote_code_is_refused_and_never_run(good, tmp_path, part):
    base = _copy_base(good, tmp_path / "base")
    marker = _needs_remote_code(base, tokenizer=part == "tokenizer")
    proc = _train(good, tmp_path / "o", f"model.path={base}")
    _refused(proc, "needs code shipped in the model dir", "never runs code from a model dir", out=tmp_path / "o")
    assert not marker.exists() and "Do you wish to run the custom code" not in proc.stderr + proc.stdout


def test_missing_tokenizer(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    _refused(_train(good, tmp_path / "o", f"model.path={base}"), "has no tokenizer", "copy the tokenizer files",
             out=tmp_path / "o")


def _raw_adapter(directory: Path, config: dict | None = None, tensors: dict | None = None,
                 raw_config: str | None = None) -> Path:
    """A PEFT-format adapter written byte by byte, as another tool (or a careless edit) might leave it."""
    import json

    import torch
    from safetensors.torch import save_file

    directory.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **(config or {})}
    (directory / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    if tensors is None:
        tensors = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}.weight": t
                   for i in range(2) for p, t in (("A", torch.randn(4, 64)), ("B", torch.randn(64, 4)))}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _adapter_cases():
    import torch

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    return {
        "no-tensors": (dict(tensors={}), "holds no LoRA tensors"),
        "int8": (dict(tensors={f"{q}.lora_A.weight": torch.ones(4, 64, dtype=torch.int8),
                               f"{q}.lora_B.weight": torch.ones(64, 4, dtype=torch.int8)}),
                 "lora_A.weight is int8; LoRA tensors must be floating point"),
        "r8-rank4": (dict(config={"r": 8}), "holds rank-4 tensors but adapter_config.json gives it r=8"),
        "list-config": (dict(raw_config='["peft_type", "LORA"]'), "must hold a JSON object"),
        "bad-alpha-pattern": (dict(config={"alpha_pattern": {"(": 2}}), "alpha_pattern key '(' is not a valid regex"),
        "1d-lora-A": (dict(tensors={f"{q}.lora_A.weight": torch.ones(256), f"{q}.lora_B.weight": torch.ones(64, 4)}),
                      "q_proj.lora_A.weight has shape (256,); LoRA tensors are 2-D"),
    }


@pytest.mark.parametrize("case", list(_adapter_cases()))
def test_bad_adapters_are_refused_by_merge(good, tmp_path, case):
    kwargs, needle = _adapter_cases()[case]
    adapter = _raw_adapter(tmp_path / "adapter", **kwargs)
    proc = lora_dist("merge", "--base", str(good["base"]), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                     check=False)
    _refused(proc, needle, command="merge", out=tmp_path / "m")


def test_a_good_raw_adapter_merges(good, tmp_path):
    # The control for the cases above: the same files, correct, merge with exit 0.
    adapter = _raw_adapter(tmp_path / "adapter")
    lora_dist("merge", "--base", str(good["base"]), "--adapter", str(adapter), "--out", str(tmp_path / "m"))
    assert (tmp_path / "m" / "config.json").is_file()


def test_a_tied_head_in_the_targets_is_refused_before_training_when_the_merged_export_is_asked(good, tiny_checkpoint,
                                                                                                tmp_path):
    """GPT-2's lm_head is its embedding: the merged export (which writes exactly the base's keys) refused it at the
    end of the run, the training lost. Now at the start, before a step or the run's config; without the merged
    export the run trains and writes the adapter."""
    gpt2 = tiny_checkpoint("gpt2", hidden=64, layers=2)
    targets = ("lora.target_modules=[c_attn,lm_head]", f"model.path={gpt2}")
    out = tmp_path / "o"
    _one_line_error(_train(good, out, *targets, "export.merged=true"), "LoRA-adapted weight lm_head.weight is not one tensor of the base",
                    "leave that layer out of lora.target_modules, or set export.merged=false")
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    proc = _train(good, tmp_path / "adapter-only", *targets)  # export.merged=false, the default
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter-only" / "adapter" / "adapter_model.safetensors").is_file()
