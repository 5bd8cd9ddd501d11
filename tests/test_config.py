"""Run configuration: defaults -> YAML file -> dotted CLI overrides, and every error a user can make."""

from __future__ import annotations

import dataclasses

import pytest
from distutil import alias_bomb

from lora_dist.config import (Config, ConfigError, config_from_dict, config_help, config_keys, config_to_dict,
                              load_config)

DEFAULTS = config_to_dict(Config())
INT_KEYS = [f"{s}.{k}" for s, section in DEFAULTS.items() for k, v in section.items() if type(v) is int]
FLOAT_KEYS = [f"{s}.{k}" for s, section in DEFAULTS.items() for k, v in section.items() if type(v) is float]


def config_error(*overrides: str) -> str:
    """The message of the :class:`ConfigError` that ``overrides`` raise; it must be one line."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=list(overrides))
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def config_file(tmp_path):
    """``config_file(text) -> path`` of a YAML file holding ``text``."""

    def write(text: str):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path

    return write


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.lora.r == 8 and cfg.lora.target_modules is None
    assert cfg.parallel.strategy == "fsdp2"
    assert isinstance(cfg.train.lr, float)


def test_precedence_cli_over_file_over_defaults(config_file):
    path = config_file(
        """
        lora:
          r: 16
          alpha: 32
        train:
          lr: 1.0e-3
          steps: 20
        """.replace("\n        ", "\n")
    )
    cfg = load_config(path, ["lora.r=4", "train.micro_batch_size=8"])
    assert cfg.lora.r == 4  # CLI over file
    assert cfg.lora.alpha == 32.0  # file over default
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 20
    assert cfg.train.micro_batch_size == 8  # CLI over default
    assert cfg.train.seq_len == Config().train.seq_len  # default
    assert load_config(path, ["lora.r=4", "lora.r=2"]).lora.r == 2  # the last override wins


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("lora.target_modules=[q_proj,k_proj]", "lora", "target_modules", ["q_proj", "k_proj"]),
        ("lora.target_modules=all-linear", "lora", "target_modules", "all-linear"),
        ("lora.target_modules=null", "lora", "target_modules", None),
        ("lora.layers_to_transform=[0, 1]", "lora", "layers_to_transform", [0, 1]),
        ("lora.rank_pattern={v_proj: 4}", "lora", "rank_pattern", {"v_proj": 4}),
        ("train.lr=3e-4", "train", "lr", 3e-4),
        ("train.lr=1", "train", "lr", 1.0),
        ("train.max_grad_norm=0", "train", "max_grad_norm", 0.0),
        ("export.merged=true", "export", "merged", True),
        ("output.dir=runs/a=b", "output", "dir", "runs/a=b"),
        ("model.path=123", "model", "path", "123"),
    ],
)
def test_override_values(override, section, key, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("model.path", "models/base", "models/base"),
        ("data.path", "data/train.jsonl", "data/train.jsonl"),
        ("lora.r", "4", 4),
        ("lora.alpha", "8", 8.0),
        ("lora.dropout", "0.1", 0.1),
        ("lora.target_modules", "[q_proj]", ["q_proj"]),
        ("parallel.strategy", "ddp", "ddp"),
        ("train.steps", "7", 7),
        ("train.micro_batch_size", "3", 3),
        ("train.grad_accum", "2", 2),
        ("train.lr", "1e-3", 1e-3),
        ("train.seq_len", "64", 64),
        ("train.seed", "3", 3),
        ("checkpoint.every", "5", 5),
        ("export.merged", "true", True),
        ("output.dir", "runs/x", "runs/x"),
    ],
)
def test_required_keys_exist(key, raw, expected):
    # Docs, launchers and saved run configs use these names: renaming one breaks them.
    section, name = key.split(".")
    assert getattr(getattr(load_config(overrides=[f"{key}={raw}"]), section), name) == expected


def test_scientific_notation_in_a_file(config_file):
    # YAML 1.1 reads "3e-4" (no dot) as a string; a learning rate written that way must still work.
    assert load_config(config_file("train:\n  lr: 3e-4\n  weight_decay: 1e-2\n")).train.lr == 3e-4


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rr'.*did you mean 'lora\.r'"):
        load_config(overrides=["lora.rr=4"])
    with pytest.raises(ConfigError, match="did you mean 'train.warmup_steps'"):
        load_config(overrides=["train.warmup_step=4"])
    with pytest.raises(ConfigError, match="did you mean 'lora"):
        load_config(overrides=["loar.r=4"])


def test_unknown_key_in_a_file_suggests_the_closest(config_file):
    with pytest.raises(ConfigError, match="did you mean 'train.micro_batch_size'"):
        load_config(config_file("train:\n  micro_batchsize: 4\n"))
    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        load_config(config_file("paralel:\n  strategy: ddp\n"))


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.lr=abc", "train.lr"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=ten", "train.steps"),
        ("export.merged=maybe", "export.merged"),
        ("lora.r=[4]", "lora.r"),
        ("lora.layers_to_transform=[a]", "lora.layers_to_transform"),
        ("lora.rank_pattern=[1]", "lora.rank_pattern"),
    ],
)
def test_wrong_type_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("lora.r=0", "lora.r must be a positive integer"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("parallel.strategy=fsdp", "parallel.strategy"),
        ("model.dtype=fp16", "model.dtype"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.lr=-1", "train.lr"),
        ("data.eval_fraction=1", "data.eval_fraction"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("lora.r", "section.key=value"),
        ("lr=3", "section.key"),
        ("train.optim.lr=3", "section.key"),
    ],
)
def test_invalid_values_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_errors(key, raw):
    assert f"{key} must be a finite number" in config_error(f"{key}={raw}")


@pytest.mark.parametrize("key", INT_KEYS)
def test_negative_integers_are_errors(key):
    assert key in config_error(f"{key}=-1")


@pytest.mark.parametrize(
    "override, match",
    [
        ("checkpoint.every=-5", "checkpoint.every must be >= 0, got -5"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.eval_batches=0", "train.eval_batches must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
        ("train.min_lr_ratio=-0.5", "train.min_lr_ratio must be >= 0"),
        ("parallel.bucket_mb=0", "parallel.bucket_mb must be > 0"),
        ("parallel.timeout_s=-1", "parallel.timeout_s must be > 0"),
    ],
)
def test_out_of_range_values_are_errors(override, match):
    assert match in config_error(override)


@pytest.mark.parametrize("raw", ["5", "1.5", "true", "{q_proj: 1}"])
@pytest.mark.parametrize("key", ["lora.target_modules", "lora.exclude_modules"])
def test_target_modules_must_be_a_string_or_a_list(key, raw):
    assert f"{key} must be a list of strings or a string or null" in config_error(f"{key}={raw}")


@pytest.mark.parametrize(
    "override, match",
    [
        ("lr=3", "did you mean 'train.lr'?"),
        ("train.optim.lr=3", "did you mean 'train.lr'?"),
        ("path=x", "did you mean 'model.path' or 'data.path'?"),
        ("learning_rate=3", "e.g. train.lr=3e-4"),
    ],
)
def test_override_without_section_suggests_the_full_key(override, match):
    message = config_error(override)
    assert override.split("=")[0] in message and match in message


def test_file_errors(config_file, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(config_file("lora:\n  r: [4\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(config_file("- lora\n- train\n"))
    with pytest.raises(ConfigError, match="section 'lora' must be a mapping"):
        load_config(config_file("lora: 4\n"))
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(config_file("train:\n  lr: fast\n"))


def test_empty_file_and_empty_section_mean_defaults(config_file):
    assert load_config(config_file("")) == Config()
    assert load_config(config_file("# nothing yet\nlora:\ntrain:\n  steps: 3\n")).train.steps == 3


def test_config_roundtrips_through_a_file(config_file):
    import yaml

    cfg = load_config(overrides=["lora.target_modules=[q_proj,v_proj]", "lora.rank_pattern={v_proj: 2}"])
    assert load_config(config_file(yaml.safe_dump(config_to_dict(cfg)))) == cfg


def test_config_help_lists_every_key_with_its_doc():
    text = config_help()
    for key in config_keys():
        assert f"  {key} (" in text, key
    assert "lora.r (int, default 8)" in text
    assert "LoRA rank." in text
    assert "Peak learning rate (AdamW)." in text
    for section in dataclasses.fields(Config):
        assert f"{section.name}:" in text
    # Every key has help text: a doc line follows each key line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.startswith("    "):
            assert i + 1 < len(lines) and lines[i + 1].startswith("      "), f"no help for {line.strip()}"


# Limits on what a config can cost (issue 15, item 7): checked while parsing, before any value is built.


def _refused_quickly(**kwargs) -> str:
    import time

    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    with pytest.raises(ConfigError) as err:
        load_config(**kwargs)
    # Bounded work: PyYAML's pure-Python scanner stops at the 20,000th value, 0.5-0.7 s here (just over 1 s once
    # on a loaded 2-core machine); what these inputs cost unrefused is minutes, or never ends.
    assert time.process_time() - start < 2.0
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message[:1000]
    return message


def test_alias_bomb_in_a_file_is_refused_in_one_short_line(config_file):
    message = _refused_quickly(path=config_file(alias_bomb()))
    assert "run.yaml: refused: more than 20000 values once its aliases are expanded" in message
    assert "lol" not in message  # the value is never expanded, not even into the message


def test_alias_bomb_in_an_override_is_refused_in_one_short_line():
    value = alias_bomb().split("target_modules: ", 1)[1].strip()
    message = _refused_quickly(overrides=[f"lora.target_modules={value}"])
    assert "override 'lora.target_modules': refused: more than 20000 values" in message


@pytest.mark.parametrize(
    "value, match",
    [
        ("[" * 5000 + "]" * 5000, "nested deeper than 16 levels"),
        ("[&a [*a]]", "an alias refers to the value that contains it"),
        ("[" + ",".join(["x"] * 30000) + "]", "more than 20000 values"),
        ("9" * 5000, "a number has thousands of digits"),
    ],
    ids=["deep", "recursive-alias", "many-values", "huge-integer"],
)
def test_costly_override_values_are_refused(value, match):
    assert match in _refused_quickly(overrides=[f"lora.target_modules={value}"])


def test_deep_nesting_through_aliases_is_refused(config_file):
    text = "lora:\n  rank_pattern: {a: &a [[[[[[[[[1]]]]]]]]], b: [[[[[[[[*a]]]]]]]]}\n"
    assert "nested deeper than 16 levels once its aliases are expanded" in _refused_quickly(path=config_file(text))


def test_a_config_file_larger_than_the_limit_is_refused_before_parsing(config_file):
    from lora_dist.inputs import MAX_CONFIG_BYTES

    text = "train:\n  steps: 3\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1)
    assert "more than the 262144 allowed" in _refused_quickly(path=config_file(text))
    assert "characters is more than the 262144" in _refused_quickly(overrides=["model.path=" + "x" * (1 << 20)])


def test_plain_aliases_still_work(config_file):
    cfg = load_config(config_file("train:\n  steps: &n 10\n  warmup_steps: *n\nlora:\n  r: &r 4\n  alpha: *r\n"))
    assert (cfg.train.steps, cfg.train.warmup_steps, cfg.lora.r, cfg.lora.alpha) == (10, 10, 4, 4.0)


@pytest.mark.parametrize(
    "override, shown",
    [
        ("train.steps=" + "x" * 100_000, "train.steps must be an integer, got 'xxxx"),
        ("train.steps=[" + ",".join(["x"] * 10_000) + "]", "train.steps must be an integer, got ['x', 'x'"),
        ("lora.target_modules=" + "(" * 10_000, "lora.target_modules '(((("),
        ("lora.rank_pattern={" + "x" * 100_000 + ": 0}", "lora.rank_pattern must be a mapping, got '{xxx"),
        ("lora.alpha=[" + ",".join(["1"] * 10_000) + "]", "lora.alpha must be a number, got [1, 1"),
    ],
    ids=["string", "list", "regex", "pattern-key", "number-list"],
)
def test_huge_values_are_shown_as_a_short_excerpt(override, shown):
    message = config_error(override)
    assert shown in message and "..." in message and len(message) < 400, message[:1000]


def test_non_utf8_config_file_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  steps: 3\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: the config file is not UTF-8 text \(byte 0xe9 at line 3"):
        load_config(path)


def test_a_saved_run_config_that_is_not_a_mapping_is_one_line():
    from lora_dist.config import config_from_dict

    for raw in (["model", "lora"], {"model": ["path"]}):
        with pytest.raises(ConfigError, match="a run config must be a mapping of sections to mappings"):
            config_from_dict(raw)  # type: ignore[arg-type]


# Ranges (issue 15, item 9): values that were accepted silently.


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.min_lr_ratio=50"], "train.min_lr_ratio must be <= 1.0, got 50.0"),
        (["train.lr=1e30"], "train.lr must be <= 1.0, got 1e+30"),
        (["train.seed=99999999999"], "train.seed must be <= 2147483647"),
        (["train.steps=10000000000"], "train.steps must be <= 2147483647"),
        (["parallel.timeout_s=1e300"], "parallel.timeout_s must be <= 604800.0"),
        (["train.lr=0.5", "train.weight_decay=2"], "train.lr * train.weight_decay must be < 1"),
        (["lora.alpha_pattern={'(': 2}"], r"lora.alpha_pattern key '(' is not a valid regex"),
        (["lora.rank_pattern={'q_proj[': 2}"], r"lora.rank_pattern key 'q_proj[' is not a valid regex"),
        (["lora.rank_pattern={1: 2}"], "lora.rank_pattern keys must be module-name regexes (strings), got 1"),
    ],
)
def test_out_of_range_values_that_were_accepted_silently(overrides, match):
    assert match in config_error(*overrides)


@pytest.mark.parametrize(
    "overrides",
    [["train.min_lr_ratio=0"], ["train.min_lr_ratio=1"], ["train.lr=1"], ["train.steps=3", "train.warmup_steps=10"]],
)
def test_range_edges_and_warmup_longer_than_the_run_are_valid(overrides):
    # warmup > steps is well defined (the LR ramps and never reaches the peak) and short test runs use it.
    cfg = load_config(overrides=overrides)
    for override in overrides:  # kept as given: not clamped into a range
        key, value = override.split("=")
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == type(getattr(getattr(cfg, section), name))(value), override


@pytest.mark.parametrize("override", ["parallel.mixed_precision=float16", "model.dtype=float16"])
def test_float16_training_is_refused_in_one_line(override):
    with pytest.raises(ConfigError, match="loss scaler.*use bfloat16"):
        load_config(None, [override])


@pytest.mark.parametrize("strategy", ["ddp", "none", "zero1", "zero2", "zero3"])
def test_cpu_offload_outside_fsdp2_is_refused_in_one_line(strategy):
    """parallel.cpu_offload is read by fsdp2 alone; elsewhere it was accepted and ignored."""
    assert config_error(f"parallel.strategy={strategy}", "parallel.cpu_offload=true") == (
        f"parallel.cpu_offload=true applies to parallel.strategy=fsdp2 only (its base shards in host memory), not "
        f"{strategy}; set parallel.strategy=fsdp2 or drop parallel.cpu_offload")
    assert not load_config(None, [f"parallel.strategy={strategy}", "parallel.cpu_offload=false"]).parallel.cpu_offload


@pytest.mark.parametrize("strategy", ["fsdp2", "auto"])
def test_cpu_offload_is_accepted_where_fsdp2_may_run(strategy):
    assert load_config(None, [f"parallel.strategy={strategy}", "parallel.cpu_offload=true"]).parallel.cpu_offload


#: Every path key of a run config, with a value under the home dir.
HOME_PATHS = {
    "model.path": "~/models/llama",
    "data.path": "~/data/train.jsonl",
    "data.eval_path": "~/data/eval.jsonl",
    "data.chat_template": "~/templates/chat.jinja",
    "data.cache_dir": "~/cache",
    "parallel.deepspeed_config": "~/ds.json",
    "checkpoint.resume": "~/runs/a/checkpoints/step-000004",
    "output.dir": "~/runs/a",
    "tracking.mlflow": "~/mlruns",
}


def test_every_path_key_expands_a_leading_tilde_once_when_the_config_is_built(tmp_path, monkeypatch, config_file):
    """~ is the home dir in every path key, in overrides (the shell does not expand it after =) and in YAML;
    unexpanded it became a dir named ~ in the working dir (output.dir) or a missing path (model.path)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    expected = {key: str(home / value[2:]) for key, value in HOME_PATHS.items()}
    values = {"parallel.strategy": "zero3", **HOME_PATHS}  # zero3: parallel.deepspeed_config's strategy
    from_overrides = load_config(None, [f"{k}={v}" for k, v in values.items()])
    sections: dict[str, str] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections[section] = sections.get(section, f"{section}:\n") + f"  {name}: {value}\n"
    from_file = load_config(config_file("".join(sections.values())))
    for cfg in (from_overrides, from_file):
        assert {key: cfg._get(key) for key in HOME_PATHS} == expected
        assert config_from_dict(config_to_dict(cfg)) == cfg  # a run's config.json: nothing left to expand
    mixture = load_config(None, ["data.path=[~/a.jsonl, {path: ~/b.jsonl, weight: 2}]"]).data.path
    assert mixture == [str(home / "a.jsonl"), {"path": str(home / "b.jsonl"), "weight": 2}]
    for key in ("checkpoint.resume=auto", "tracking.mlflow=http://mlflow:5000", "model.path=models/~x"):
        cfg = load_config(None, [key])
        assert cfg._get(key.split("=")[0]) == key.split("=", 1)[1]  # not a path, or no leading ~


def test_a_model_path_under_home_opens(tmp_path, monkeypatch, tiny_checkpoint):
    from lora_dist.model_dir import ModelDir

    home = tmp_path / "home"
    home.mkdir()
    (home / "m").symlink_to(tiny_checkpoint("llama"))
    monkeypatch.setenv("HOME", str(home))
    cfg = load_config(None, ["model.path=~/m"])
    assert ModelDir(cfg.model.path).hf_config.model_type == "llama"


def test_a_tilde_user_that_does_not_exist_is_refused_in_one_line():
    assert config_error("output.dir=~no-such-user-x/runs") == (
        "output.dir='~no-such-user-x/runs' starts with '~no-such-user-x', but no such user has a home dir; write the "
        "full path (with ./ before it for a dir of that name in the working dir)")


def test_tracking_section():
    cfg = load_config(None, ["tracking.mlflow=/tmp/mlruns", "tracking.wandb=offline", "tracking.tensorboard=false"])
    assert (cfg.tracking.mlflow, cfg.tracking.wandb, cfg.tracking.tensorboard) == ("/tmp/mlruns", "offline", False)
    assert load_config(None, []).tracking.tensorboard  # on by default
    with pytest.raises(ConfigError, match="tracking.wandb='cloud' is not one of offline, online"):
        load_config(None, ["tracking.wandb=cloud"])


@pytest.mark.parametrize("override, want", [
    # YAML's true where a checkpoint dir or auto/never is expected: what the key takes, in the user's spelling
    ("checkpoint.resume=true", "checkpoint.resume must be a string, got true; checkpoint.resume: auto (this run's "
                               "latest checkpoint in output.dir, if any), never"),
    ("model.path=null", "model.path must be a string, got null; model.path: Local Hugging Face checkpoint dir"),
    ("train.steps=ten", "train.steps must be an integer, got 'ten'; train.steps: Optimizer steps"),
    # a doc's "e.g." ends no sentence
    ("parallel.strategy=true", "parallel.strategy: fsdp2 (default; over one shard rank, e.g. one GPU, it runs as"),
    ("parallel.activation_checkpointing=maybe", "must be true or false or an integer, got 'maybe'"),
])
def test_a_value_of_the_wrong_type_is_refused_with_what_the_key_takes(override, want):
    assert want in config_error(override)


@pytest.mark.parametrize("value, meant", [("nevr", "never"), ("Never", "never"), ("aut", "auto")])
def test_a_misspelled_resume_mode_is_refused_before_any_work(value, meant, tmp_path, monkeypatch):
    """checkpoint.resume=nevr was read as a checkpoint dir: refused only after the model and data loaded ("nevr is
    unreadable"), with a new output.dir's marker and lock left behind. A dir of that name is still a checkpoint."""
    monkeypatch.chdir(tmp_path)
    assert f"checkpoint.resume={value!r} is neither auto, never nor a checkpoint dir; did you mean {meant}?" in \
        config_error(f"checkpoint.resume={value}")
    from lora_dist.config import config_from_dict

    # a run's recorded config.json reads back (lora-dist export RUN_DIR) whatever the working dir holds
    assert config_from_dict({"checkpoint": {"resume": value}}).checkpoint.resume == value
    (tmp_path / value).mkdir()
    assert load_config(None, [f"checkpoint.resume={value}"]).checkpoint.resume == value


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  steps: 5\nlora:\n  r: 4\ntrain:\n  lr: 1.0e-3\n", "train", "lines 1 and 5"),
    ("train:\n  steps: 5\n  lr: 1.0e-3\n  steps: 7\n", "steps", "lines 2 and 4"),
    ("lora: {r: 4, r: 8}\n", "r", "lines 1 and 1"),
])
def test_a_key_given_twice_in_a_file_is_refused_naming_it_and_its_lines(config_file, text, key, lines):
    """PyYAML keeps the last of two equal keys: the first section or value was silently lost."""
    with pytest.raises(ConfigError) as err:
        load_config(config_file(text))
    message = str(err.value)
    assert "\n" not in message and "run.yaml" in message, message
    assert f"{key!r} is given twice ({lines})" in message and "merge the two into one" in message, message


def test_merge_keys_still_work_and_their_keys_give_way(config_file):
    cfg = load_config(config_file("train:\n  <<: &base {steps: 10, lr: 1.0e-3}\n  steps: 20\n"))
    assert (cfg.train.steps, cfg.train.lr) == (20, 1e-3)


@pytest.mark.parametrize("key, text", [
    ("output.dir", "0042"),  # YAML 1.1: octal 34
    ("output.dir", "1_000"),
    ("output.dir", "2024-01-01"),  # a date
    ("tracking.run_name", "1.10"),  # 1.1
    ("tracking.run_name", "1.5e+3"),
    ("model.path", "0x10"),  # 16
    ("checkpoint.resume", "1:30"),  # base 60: 90
    ("data.chat_template", ".inf"),
])
def test_a_text_key_keeps_the_text_yaml_reads_as_a_number(config_file, key, text):
    section, name = key.split(".")
    for cfg in (load_config(overrides=[f"{key}={text}"]), load_config(config_file(f"{section}:\n  {name}: {text}\n"))):
        value = getattr(getattr(cfg, section), name)
        assert value == text and type(value) is str


@pytest.mark.parametrize("text", ["yes", "No", "on", "OFF", "YES"])
def test_a_text_key_keeps_the_words_yaml_reads_as_booleans_and_a_flag_still_reads_them(config_file, text):
    """YAML 1.1 reads yes/no/on/off as booleans: tracking.run_name=yes was refused as "must be a string, got true"."""
    meaning = text.lower() in ("yes", "on")
    for cfg in (load_config(overrides=[f"tracking.run_name={text}", f"export.merged={text}", f"output.dir={text}"]),
                load_config(config_file(f"tracking:\n  run_name: {text}\nexport:\n  merged: {text}\n"
                                        f"output:\n  dir: {text}\n"))):
        assert cfg.tracking.run_name == text and type(cfg.tracking.run_name) is str
        assert cfg.output.dir == text and type(cfg.output.dir) is str
        assert cfg.export.merged is meaning


def test_a_boolean_word_where_a_number_goes_is_refused_as_written():
    assert "train.steps must be an integer, got yes" in config_error("train.steps=yes")
    assert "train.lr must be a number, got off" in config_error("train.lr=off")


def test_numbers_stay_plain_numbers(config_file):
    import json

    cfg = load_config(config_file("train:\n  steps: 0x10\n  lr: 1.0e-3\ndata:\n  path: [{path: a.jsonl, weight: 2}]\n"),
                      ["train.seed=010", "lora.alpha=16"])
    assert (cfg.train.steps, cfg.train.seed) == (16, 8)  # YAML 1.1 still reads them for number keys
    assert type(cfg.train.steps) is int and type(cfg.train.lr) is float and type(cfg.lora.alpha) is float
    assert type(cfg.data.path[0]["weight"]) is int
    assert json.loads(json.dumps(config_to_dict(cfg))) == config_to_dict(cfg)


def test_a_number_where_text_is_refused_is_shown_as_written():
    assert "got 0042" in config_error("data.path=0042")


@pytest.mark.parametrize("value", ["big", "0GB", "5XB", "-1GB", "5 G B"])
def test_export_max_shard_size_is_checked_with_the_config(value):
    """It used to be parsed only after training, a ValueError traceback on every rank."""
    message = config_error(f"export.max_shard_size={value}")
    assert message.startswith(f"export.max_shard_size={value!r} is not a positive size") and "5GB" in message


@pytest.mark.parametrize("value", ["500MB", "5GB", "2GiB", "1000000", "0.5GB"])
def test_export_max_shard_sizes_that_parse(value):
    assert load_config(overrides=[f"export.max_shard_size={value}"]).export.max_shard_size == value


@pytest.fixture
def ds_file(tmp_path):
    """``ds_file(text) -> path`` of a DeepSpeed JSON config holding ``text``."""

    def write(text: str) -> str:
        path = tmp_path / "ds.json"
        path.write_text(text)
        return str(path)

    return write


@pytest.mark.parametrize("strategy, text, match", [
    ("zero3", None, "no such file; give the path of a DeepSpeed JSON config, or drop parallel.deepspeed_config"),
    ("zero3", '{"zero_optimization": {"stage": 3},}', "is not valid JSON"),
    ("zero3", "[3]", "not a JSON object"),
    ("zero3", '{"zero_optimization": 3}', "zero_optimization is 3, not an object"),
    ("zero3", '{"zero_optimization": {"stage": 2}}',
     'zero_optimization.stage is 2 but parallel.strategy=zero3 is stage 3; make them agree ("stage": 3 in the file '
     "or parallel.strategy=zero2)"),
    ("zero1", '{"zero_optimization": {"stage": 0}}', "zero_optimization.stage is 0 but parallel.strategy=zero1"),
    ("fsdp2", '{"zero_optimization": {"stage": 3}}', "used by the zero strategies only, not parallel.strategy=fsdp2"),
    ("auto", '{"zero_optimization": {"stage": 3}}', "not parallel.strategy=auto"),
])
def test_deepspeed_config_file_is_checked_when_a_run_starts(tmp_path, ds_file, strategy, text, match):
    """A missing or malformed file used to be a FileNotFoundError / JSONDecodeError traceback after tokenization.
    The strategy is checked with the config; the file when a run starts (``check_launch``, before any work), so
    a finished run's config whose file moved since still loads (``lora-dist export RUN_DIR``)."""
    from lora_dist.launch import LaunchEnv
    from lora_dist.session import check_launch

    path = str(tmp_path / "missing.json") if text is None else ds_file(text)
    overrides = [f"parallel.strategy={strategy}", f"parallel.deepspeed_config={path}"]
    if not strategy.startswith("zero"):
        assert match in config_error(*overrides)
        return
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError) as e:
        check_launch(cfg, LaunchEnv("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0))
    assert match in str(e.value) and "\n" not in str(e.value)


def test_a_runs_config_whose_deepspeed_file_moved_still_loads(tmp_path):
    cfg = load_config(overrides=["parallel.strategy=zero3", f"parallel.deepspeed_config={tmp_path / 'gone.json'}"])
    assert cfg.parallel.deepspeed_config.endswith("gone.json")


def test_deepspeed_config_file_without_a_stage_runs_the_strategys(ds_file):
    from lora_dist.parallel.deepspeed import deepspeed_config

    path = ds_file('{"zero_optimization": {"overlap_comm": true}, "train_batch_size": 64}')
    cfg = load_config(overrides=["parallel.strategy=zero2", f"parallel.deepspeed_config={path}", "train.grad_accum=4"])
    ds = deepspeed_config(cfg, None)  # a file's config needs nothing of the model
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_accumulation_steps"] == 4 and "train_batch_size" not in ds
    path = ds_file('{"zero_optimization": {"stage": 2}}')
    cfg = load_config(overrides=["parallel.strategy=zero2", f"parallel.deepspeed_config={path}"])
    assert deepspeed_config(cfg, None)["zero_optimization"] == {"stage": 2}
