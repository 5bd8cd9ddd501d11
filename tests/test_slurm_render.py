"""lora_dist.slurm: the rendered sbatch script, its quoting and validation, the CLI glue.

The quoting tests execute rendered scripts for real with stub ``scontrol`` and
``srun`` executables on PATH: the stub srun records the argv it received, so a
test sees exactly what the nodes would run, and canary files show that no
hostile value was executed along the way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lora_dist import slurm
from lora_dist.slurm import SlurmError, add_slurm_subparser, render_sbatch, run_slurm_command

REPO = Path(__file__).resolve().parents[1]

HOSTILE = [
    "cfg with spaces.yaml",
    "$(touch CANARY_subst)",
    "`touch CANARY_backtick`",
    "'; touch CANARY_quote; '",
    '"; touch CANARY_dquote; "',
    "a\nb; touch CANARY_newline",
    "${IFS}*?[]{a,b}~!#&|<>\\",
    "",
]


def write_stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stub scontrol/srun; returns run(script_text) -> argv srun received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(
        bin_dir / "scontrol",
        'case "$1 $2" in\n'
        '  "show hostnames") echo n1; echo n2 ;;\n'
        '  "show node") echo "   NodeAddr=10.9.8.7 NodeHostName=h1 Version=22.05" ;;\n'
        "esac\n",
    )
    argv_file = tmp_path / "srun.argv"
    write_stub(bin_dir / "srun", f"printf '%s\\0' \"$@\" > {argv_file}\n")
    work = tmp_path / "work"
    work.mkdir()

    def run(script: str, *args: str) -> list[str]:
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_NNODES": "2",
            "SLURM_GPUS_ON_NODE": "4",
        }
        proc = subprocess.run(["bash", str(path), *args], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        canaries = [p.name for p in work.iterdir() if p.name.startswith("CANARY")]
        assert not canaries, f"a hostile value was executed: {canaries}"
        return argv_file.read_text().split("\0")[:-1]

    return run


def training_argv(srun_argv: list[str]) -> list[str]:
    """The command after torchrun's `--no-python`."""
    return srun_argv[srun_argv.index("--no-python") + 1 :]


# ----------------------------------------------------------------- the template


def test_repository_template_is_the_default_render():
    assert (REPO / "slurm" / "multi_node.sbatch").read_text() == render_sbatch(), (
        "slurm/multi_node.sbatch drifted from lora_dist/slurm.py; regenerate it with "
        "`python -m lora_dist.slurm > slurm/multi_node.sbatch`"
    )


@pytest.mark.parametrize("name", ["single_node", "multi_node", "per_gpu_tasks", "preemptible"])
def test_shipped_templates_parse(name):
    path = REPO / "slurm" / f"{name}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    directives = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --output=logs/%x-%j.out" in directives


def test_preemptible_exit_code_matches_the_trainer():
    checkpoint = pytest.importorskip("lora_dist.checkpoint")
    text = (REPO / "slurm" / "preemptible.sbatch").read_text()
    assert f"\nPREEMPT_EXIT_CODE={checkpoint.PREEMPT_EXIT_CODE}\n" in text


def test_generic_template_launches_torchrun_per_node_on_the_first_node_address(fake_slurm):
    argv = fake_slurm(render_sbatch(), "cfg.yaml", "a.b=1")
    assert argv[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    assert "--nproc_per_node=4" in argv  # from SLURM_GPUS_ON_NODE
    assert "--master_addr=10.9.8.7" in argv  # NodeAddr of the first node, not its name
    assert f"--master_port={20000 + 4242 % 10000}" in argv
    assert training_argv(argv) == ["lora-dist", "train", "cfg.yaml", "a.b=1"]


def test_generic_template_needs_a_config(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch())
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 2
    assert "usage" in proc.stderr


# ----------------------------------------------------------------- quoting


@pytest.mark.parametrize("value", [v for v in HOSTILE if v], ids=range(len(HOSTILE) - 1))
def test_hostile_config_path_reaches_the_command_unchanged(fake_slurm, value):
    script = render_sbatch(value, [f"note={value}"])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert training_argv(fake_slurm(script)) == ["lora-dist", "train", value, f"note={value}"]


def test_hostile_overrides_round_trip_through_bash(tmp_path):
    overrides = [f"key{i}.x={v}" for i, v in enumerate(HOSTILE)]
    script = render_sbatch("c.yaml", overrides)
    # The `set -- ...` statement (a quoted newline may span lines), run on its own.
    start = script.index("\nset -- ") + 1
    statement = script[start : script.index("\nset -euo pipefail", start)]
    proc = subprocess.run(
        ["bash", "-c", statement + "\nprintf '%s\\0' \"$@\""], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\0")[:-1] == ["c.yaml", *overrides]
    assert not list(tmp_path.glob("CANARY*"))


def test_venv_path_is_quoted(fake_slurm, tmp_path):
    venv = tmp_path / "my venv $(touch CANARY_venv)"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export ACTIVATED_FROM_VENV=1\n")
    script = render_sbatch("c.yaml", venv=str(venv))
    assert training_argv(fake_slurm(script)) == ["lora-dist", "train", "c.yaml"]


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodes": 0}, "--nodes"),
        ({"nodes": -3}, "--nodes"),
        ({"nodes": "2"}, "--nodes"),
        ({"gpus_per_node": 0}, "--gpus-per-node"),
        ({"time": "1h"}, "time limit"),
        ({"time": "04:00:00; rm -rf /"}, "time limit"),
        ({"time": "04:00:00\n#SBATCH --wrap=x"}, "time limit"),
        ({"job_name": "my job"}, "job name"),
        ({"job_name": "x\n#SBATCH --uid=0"}, "job name"),
        ({"job_name": "-x"}, "job name"),
        ({"partition": "gpu$(id)"}, "partition"),
        ({"partition": "a,,b"}, "partition"),
        ({"account": "acct name"}, "account"),
        ({"log_dir": "my logs"}, "log directory"),
        ({"log_dir": "logs/%u"}, "log directory"),
        ({"config": ""}, "config"),
        ({"config": "c.yaml", "overrides": ["no_equals_sign"]}, "override"),
        ({"config": "c.yaml", "overrides": ["=value"]}, "override"),
        ({"config": "c.yaml", "overrides": ["$(x)=1"]}, "override"),
        ({"overrides": ["a=1"]}, "overrides need a config"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(SlurmError, match=message.replace("$", r"\$")):
        render_sbatch(**kwargs)


@pytest.mark.parametrize("value", ["30", "30:00", "04:00:00", "2-00", "2-12:00", "1-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(value):
    assert f"#SBATCH --time={value}\n" in render_sbatch(time=value)


def test_optional_directives_appear_only_when_given():
    plain = render_sbatch("c.yaml")
    assert "--partition" not in plain and "--account" not in plain
    full = render_sbatch("c.yaml", nodes=16, gpus_per_node=4, partition="gpu,gpu-long", account="proj.1", time=None)
    for line in ["--nodes=16", "--gpus-per-node=4", "--partition=gpu,gpu-long", "--account=proj.1"]:
        assert f"#SBATCH {line}\n" in full
    assert "--time" not in full


# ----------------------------------------------------------------- the CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-dist")
    add_slurm_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["slurm", *argv])


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "my config.yaml"
    path.write_text("model: {}\n")
    return path


def test_dry_run_prints_the_script(config_file, tmp_path, capsys):
    args = parse([str(config_file), "--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1-00:00",
                  "--account", "acct", "--output-dir", str(tmp_path / "runs"), "--dry-run", "--", "train.lr=1e-4",
                  "output.dir=runs/x y"])  # fmt: skip
    assert args.func is run_slurm_command
    assert run_slurm_command(args) == 0
    script = capsys.readouterr().out
    for line in ["--nodes=3", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00", "--account=acct",
                 f"--output={tmp_path / 'runs' / 'logs'}/%x-%j.out"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert f"set -- '{config_file}' train.lr=1e-4 'output.dir=runs/x y'\n" in script
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_options_may_come_before_or_after_the_config(config_file, capsys):
    for argv in (
        ["--nodes", "5", str(config_file), "--dry-run", "--", "a=1"],
        [str(config_file), "--nodes", "5", "--dry-run", "--", "a=1"],
        [str(config_file), "--dry-run", "a=1", "--nodes=5"],
    ):
        assert run_slurm_command(parse(argv)) == 0
        script = capsys.readouterr().out
        assert "#SBATCH --nodes=5\n" in script
        assert f"set -- '{config_file}' a=1\n" in script


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.yaml", "--dry-run"], "config not found"),
        (["{config}", "--nodes", "0", "--dry-run"], "--nodes"),
        (["{config}", "--time", "soon", "--dry-run"], "time limit"),
        (["{config}", "--dry-run", "--bogus"], "unknown option"),
        (["{config}", "--dry-run", "--", "not-an-override"], "override"),
    ],
)
def test_cli_errors_exit_2_with_a_message(config_file, capsys, argv, message):
    argv = [a.replace("{config}", str(config_file)) for a in argv]
    assert run_slurm_command(parse(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-dist slurm: error:") and message in err


def test_submit_without_sbatch_says_so(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert run_slurm_command(parse([str(config_file), "--output-dir", str(tmp_path / "runs")])) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_submit_writes_the_script_and_returns_the_job_id(config_file, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "sbatch", f'cp "$2" {tmp_path}/submitted.sbatch; echo "77;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert run_slurm_command(parse([str(config_file), "--output-dir", str(tmp_path / "runs"), "--", "a=1"])) == 0
    assert "submitted job 77" in capsys.readouterr().out
    (kept,) = (tmp_path / "runs").glob("lora-dist-*.sbatch")
    assert kept.read_text() == (tmp_path / "submitted.sbatch").read_text()
    assert (tmp_path / "runs" / "logs").is_dir()


def test_sbatch_rejection_is_reported(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "sbatch", 'echo "sbatch: error: invalid partition" >&2; exit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SlurmError, match="invalid partition"):
        slurm.submit(render_sbatch("c.yaml"), tmp_path / "job.sbatch")
