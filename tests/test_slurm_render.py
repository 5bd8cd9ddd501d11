"""lora_dist.slurm and the Slurm/MPI launch scripts: rendering, quoting, validation, the CLI.

The quoting tests execute rendered scripts for real with stub ``scontrol`` and
``srun`` executables on PATH: the stub srun records the argv and environment it
received, so a test sees exactly what the nodes would run, and canary files
show that no hostile value was executed along the way. The per-node block that
picks the network interface runs for real too, with stub ``ip``/``rdma``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lora_dist import slurm
from lora_dist.slurm import IFNAME_BLOCK, SITE_NETWORK_VARS, SlurmError, render_sbatch, run_slurm

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["single_node", "multi_node", "per_gpu_tasks", "preemptible"]

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


@pytest.fixture(autouse=True)
def no_site_network_settings(monkeypatch):
    """run_slurm exports these from the environment; tests start without them."""
    for name in SITE_NETWORK_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stub scontrol/srun; returns run(script_text, *args, **env) -> argv srun received.

    ``run.environ`` is then the environment srun was started with.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(
        bin_dir / "scontrol",
        'case "$1 $2" in\n'
        '  "show hostnames") echo n1; echo n2 ;;\n'
        '  "show node") echo "   NodeAddr=10.9.8.7 NodeHostName=h1 Version=22.05" ;;\n'
        '  "requeue "*) echo "requeue $2" >> REQUEUED ;;\n'
        "esac\n",
    )
    argv_file, env_file = tmp_path / "srun.argv", tmp_path / "srun.env"
    write_stub(bin_dir / "srun", f"printf '%s\\0' \"$@\" > {argv_file}\nenv -0 > {env_file}\nexit ${{SRUN_EXIT:-0}}\n")
    work = tmp_path / "work"
    work.mkdir()

    def run(script: str, *args: str, **extra_env: str) -> list[str]:
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS": "8",
            "SLURM_GPUS_ON_NODE": "4",
            "SLURM_CPUS_ON_NODE": "16",
            **extra_env,
        }
        proc = subprocess.run(["bash", str(path), *args], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        canaries = [p.name for p in work.iterdir() if p.name.startswith("CANARY")]
        assert not canaries, f"a hostile value was executed: {canaries}"
        run.environ = dict(item.split("=", 1) for item in env_file.read_text().split("\0")[:-1])
        run.stdout = proc.stdout
        return argv_file.read_text().split("\0")[:-1]

    run.work = work
    return run


def training_argv(srun_argv: list[str]) -> list[str]:
    """The command after torchrun's `--no-python`."""
    return srun_argv[srun_argv.index("--no-python") + 1 :]


def template(name: str) -> str:
    return (REPO / "slurm" / f"{name}.sbatch").read_text()


# ----------------------------------------------------------------- the template


def test_repository_template_is_the_default_render():
    assert template("multi_node") == render_sbatch(), (
        "slurm/multi_node.sbatch drifted from lora_dist/slurm.py; regenerate it with "
        "`python -m lora_dist.slurm > slurm/multi_node.sbatch`"
    )


@pytest.mark.parametrize("name", TEMPLATES)
def test_shipped_templates_parse(name):
    path = REPO / "slurm" / f"{name}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    directives = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --output=logs/%x-%j.out" in directives


def test_preemptible_exit_code_matches_the_trainer():
    from lora_dist.preemption import PREEMPT_EXIT_CODE

    text = template("preemptible")
    assert f"\nPREEMPT_EXIT_CODE={PREEMPT_EXIT_CODE}\n" in text


@pytest.mark.parametrize("restarts, resume", [(None, "/old/ckpt"), ("0", "/old/ckpt"), ("1", "auto"), ("3", "auto")])
def test_preemptible_requeue_resumes_its_own_checkpoint_over_an_explicit_one(fake_slurm, restarts, resume):
    """The first run starts from the checkpoint.resume=DIR given; a requeued one from the job's latest checkpoint,
    not from DIR again (checkpoint.resume=auto after the user's overrides: the last one wins)."""
    from lora_dist.config import load_config

    env = {} if restarts is None else {"SLURM_RESTART_COUNT": restarts}
    argv = fake_slurm(template("preemptible"), "cfg.yaml", "checkpoint.resume=/old/ckpt", "train.lr=1e-4", **env)
    args = argv[argv.index("lora-dist") + 2 :]
    assert args[0] == "cfg.yaml" and sorted(args[1:]) == ["checkpoint.resume=/old/ckpt", "checkpoint.resume=auto",
                                                         "train.lr=1e-4"]
    assert load_config(None, args[1:]).checkpoint.resume == resume


def test_generic_template_launches_torchrun_per_node_on_the_first_node_address(fake_slurm):
    argv = fake_slurm(render_sbatch(), "cfg.yaml", "a.b=1")
    # The whole node's CPUs (SLURM_CPUS_ON_NODE under --exclusive) for torchrun and its workers, unbound.
    assert argv[:5] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=16", "--cpu-bind=none", "bash"]
    assert "--nproc_per_node=4" in argv  # from SLURM_GPUS_ON_NODE
    assert "--master_addr=10.9.8.7" in argv  # NodeAddr of the first node, not its name
    assert f"--master_port={20000 + 4242 % 12000}" in argv
    assert training_argv(argv) == ["lora-dist", "train", "cfg.yaml", "a.b=1"]
    assert fake_slurm.environ["OMP_NUM_THREADS"] == "4"  # 16 CPUs / 4 workers


def test_generic_template_needs_a_config(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch())
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 2
    assert "usage" in proc.stderr


# ----------------------------------------------------------------- CPUs per task


@pytest.mark.parametrize(
    "env, cpus, threads",
    [
        ({}, "16", "4"),  # the node's CPUs (--exclusive) / 4 workers
        ({"SLURM_CPUS_PER_TASK": "6"}, "6", "1"),  # --cpus-per-task caps it; at least one thread
        ({"SLURM_CPUS_PER_TASK": "64", "NPROC_PER_NODE": "8"}, "64", "8"),
        ({"OMP_NUM_THREADS": "3"}, "16", "3"),  # an explicit value wins
        # a mixed partition: srun asks every node for the smallest node's CPUs (more would be refused there)
        ({"SLURM_JOB_CPUS_PER_NODE": "128(x2),96", "SLURM_CPUS_ON_NODE": "128"}, "96", "24"),
        ({"SLURM_JOB_CPUS_PER_NODE": "16(x2)"}, "16", "4"),
    ],
)
def test_multi_node_gives_torchrun_the_cpus_and_splits_them_over_workers(fake_slurm, env, cpus, threads):
    argv = fake_slurm(render_sbatch(), "cfg.yaml", **env)
    assert f"--cpus-per-task={cpus}" in argv[: argv.index("bash")]
    assert "--cpu-bind=none" in argv[: argv.index("bash")]
    assert fake_slurm.environ["OMP_NUM_THREADS"] == threads


def test_single_node_requests_cpus_for_all_workers(fake_slurm):
    text = template("single_node")
    assert "#SBATCH --cpus-per-task=32\n" in text
    argv = fake_slurm(text, "cfg.yaml", "a=1", SLURM_CPUS_PER_TASK="32", SLURM_GPUS_ON_NODE="8")
    assert argv[:4] == ["--ntasks=1", "--cpus-per-task=32", "--cpu-bind=none", "torchrun"]
    assert "--nproc_per_node=8" in argv
    assert training_argv(argv) == ["lora-dist", "train", "cfg.yaml", "a=1"]
    assert fake_slurm.environ["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("name", ["per_gpu_tasks", "preemptible"])
def test_per_gpu_templates_pass_cpus_per_task_to_srun(fake_slurm, name):
    text = template(name)
    assert "#SBATCH --cpus-per-task=4\n" in text
    argv = fake_slurm(text, "cfg.yaml", SLURM_CPUS_PER_TASK="4")
    assert "--cpus-per-task=4" in argv[: argv.index("bash")]
    assert fake_slurm.environ["OMP_NUM_THREADS"] == "4"


def test_cpus_per_task_option_renders_a_directive():
    assert "--cpus-per-task" not in "".join(line for line in render_sbatch().splitlines() if line.startswith("#SBATCH"))
    assert "#SBATCH --cpus-per-task=48\n" in render_sbatch("c.yaml", cpus_per_task=48)
    with pytest.raises(SlurmError, match="--cpus-per-task"):
        render_sbatch("c.yaml", cpus_per_task=0)


# ----------------------------------------------------------------- network interface


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_carry_the_site_network_block(name):
    text = template(name)
    for variable in SITE_NETWORK_VARS:
        assert f"\n# export {variable}=" in text, f"{name}.sbatch: no commented {variable} in the site network block"
    assert text.index("# Site network settings") > text.rindex("#SBATCH")


@pytest.mark.parametrize("name", ["per_gpu_tasks", "preemptible"])
def test_interface_block_is_the_same_in_every_template(name):
    assert IFNAME_BLOCK in template(name)
    assert IFNAME_BLOCK in render_sbatch()


IP_ADDR_LINE = (
    "{n}: {name}    inet {addr}/24 brd 10.0.0.255 scope global {name}\\       valid_lft forever preferred_lft forever"
)


@pytest.fixture
def node_block(fake_slurm, tmp_path):
    """run(SOCKET_IFNAME, interfaces, route_dev, rdma, **env) -> (exit code, NCCL/GLOO variables, stderr):
    the per-node block of multi_node.sbatch run with stub ip/getent/rdma and a torchrun that prints."""
    argv = fake_slurm(render_sbatch(), "cfg.yaml")
    block = argv[argv.index("-c") + 1]
    bin_dir = tmp_path / "node-bin"
    bin_dir.mkdir()
    write_stub(
        bin_dir / "ip",
        'case "$*" in\n'
        '  "-o -4 addr show up") printf "%s\\n" "$FAKE_ADDRS" ;;\n'
        '  "-o -4 addr show to 10.9.8.7") printf "%s" "$FAKE_HOLDS_MASTER" ;;\n'
        '  "-o -4 route get 10.9.8.7") echo "10.9.8.7 via 10.0.0.1 dev $FAKE_ROUTE_DEV src 10.0.0.5 uid 0" ;;\n'
        '  *) echo "unexpected: ip $*" >&2; exit 1 ;;\n'
        "esac\n",
    )
    write_stub(bin_dir / "getent", 'echo "10.9.8.7        STREAM 10.9.8.7"\n')
    write_stub(bin_dir / "rdma", 'printf "%s\\n" "$FAKE_RDMA"\n')
    write_stub(bin_dir / "torchrun", 'echo "NCCL=${NCCL_SOCKET_IFNAME-unset} GLOO=${GLOO_SOCKET_IFNAME-unset}"\n')

    def run(socket_ifname, interfaces=(), route_dev="eno1", rdma="", holds_master="", **env):
        addrs = "\n".join(
            IP_ADDR_LINE.format(n=i + 1, name=name, addr=f"10.0.{i}.5") for i, name in enumerate(interfaces)
        )
        environ = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SOCKET_IFNAME": socket_ifname,
            "MASTER_ADDR": "10.9.8.7",
            "SLURMD_NODENAME": "n2",
            "FAKE_ADDRS": addrs,
            "FAKE_ROUTE_DEV": route_dev,
            "FAKE_RDMA": rdma,
            "FAKE_HOLDS_MASTER": holds_master,
            **env,
        }
        proc = subprocess.run(["bash", "-c", block, "bash"], env=environ, capture_output=True, text=True)
        return proc.returncode, proc.stdout.strip(), proc.stderr

    return run


ROCE = "link mlx5_0/1 state ACTIVE physical_state LINK_UP netdev ens1f0np0"
ROCE_DOWN = "link mlx5_0/1 state DOWN physical_state DISABLED netdev ens1f0np0"
IB_LINK = (
    "link mlx5_1/1 subnet_prefix fe80:0000:0000:0000 lid 5 sm_lid 1 lmc 0 state ACTIVE physical_state LINK_UP "
    "netdev ib0"
)


@pytest.mark.parametrize(
    "socket_ifname, interfaces, rdma, holds_master, chosen",
    [
        # The management Ethernet carries the route to the master; the fast network wins.
        ("auto", ["lo", "docker0", "eno1", "ib0"], IB_LINK, "", "ib0"),
        ("auto", ["lo", "eno1", "ib1", "ib0"], "", "", "ib1"),  # IPoIB without the rdma tool's help
        ("auto", ["lo", "eno1", "hsn0"], "", "", "hsn0"),  # Slingshot
        ("auto", ["lo", "eno1", "ens1f0np0"], ROCE, "", "ens1f0np0"),  # RoCE: netdev of an active RDMA port
        ("auto", ["lo", "eno1", "ens1f0np0"], ROCE_DOWN, "", "eno1"),  # a port that is down does not count
        ("auto", ["lo", "virbr0", "eno1"], "", "", "eno1"),  # nothing fast: the route to the master
        ("auto", ["lo", "eth0"], "", "3: eth0    inet 10.9.8.7/24 scope global eth0", "eth0"),  # on the master
        ("route", ["lo", "eno1", "ib0"], IB_LINK, "", "eno1"),  # route: always the way to the master
        ("ib3", [], "", "", "ib3"),  # a name is taken as it is
    ],
)
def test_socket_ifname_resolution(node_block, socket_ifname, interfaces, rdma, holds_master, chosen):
    code, out, err = node_block(socket_ifname, interfaces, rdma=rdma, holds_master=holds_master)
    assert code == 0, err
    assert out == f"NCCL={chosen} GLOO={chosen}"
    if socket_ifname in ("auto", "route"):
        assert f"n2: SOCKET_IFNAME={socket_ifname} -> {chosen}" in err


def test_socket_ifname_unset_leaves_the_libraries_alone(node_block):
    assert node_block("")[:2] == (0, "NCCL=unset GLOO=unset")


def test_explicit_library_variables_win_over_socket_ifname(node_block):
    code, out, err = node_block("auto", ["lo", "eno1", "ib0"], NCCL_SOCKET_IFNAME="ib1")
    assert (code, out) == (0, "NCCL=ib1 GLOO=ib0"), err


@pytest.mark.parametrize("route_dev", ["docker0", "lo", "veth12ab", "br-0123456789ab"])
def test_auto_never_picks_loopback_or_container_links(node_block, route_dev):
    code, out, err = node_block("auto", ["lo", "docker0", "veth12ab", "br-0123456789ab"], route_dev=route_dev)
    assert code == 1 and "NCCL=" not in out
    assert "no usable interface" in err and "set SOCKET_IFNAME=" in err


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


def test_exported_values_reach_the_job_unchanged(fake_slurm):
    env = {f"SITE_{i}": value for i, value in enumerate(HOSTILE)}
    env["NCCL_IB_HCA"] = "mlx5_0,mlx5_1"
    script = render_sbatch("c.yaml", env=env)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    fake_slurm(script)
    for key, value in env.items():
        assert fake_slurm.environ[key] == value


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
        ({"env": {"A B": "1"}}, "variable name"),
        ({"env": {"$(x)": "1"}}, "variable name"),
        ({"env": {"SLURM_NNODES": "1"}}, "SLURM_"),
        ({"env": {"A": "x\0y"}}, "NUL"),
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


# ----------------------------------------------------------------- run_slurm


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "my config.yaml"
    path.write_text("model: {}\n")
    return path


def test_run_slurm_dry_run_returns_the_script(config_file, tmp_path):
    script = run_slurm(str(config_file), ["train.lr=1e-4", "output.dir=runs/x y"], nodes=3, gpus_per_node=4,
                       partition="gpu", time="1-00:00", account="acct", output_dir=str(tmp_path / "runs"),
                       dry_run=True)  # fmt: skip
    for line in ["--nodes=3", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00", "--account=acct",
                 f"--output={tmp_path / 'runs' / 'logs'}/%x-%j.out"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert f"set -- '{config_file}' train.lr=1e-4 'output.dir=runs/x y'\n" in script
    assert "Exported by" not in script, "nothing to export: no --env, no site variables set"
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_run_slurm_makes_the_config_absolute_and_takes_a_leading_separator(config_file, monkeypatch):
    monkeypatch.chdir(config_file.parent)
    script = run_slurm(config_file.name, ["--", "lora.r=4"], dry_run=True)
    assert f"set -- '{config_file}' lora.r=4\n" in script


def test_run_slurm_exports_env_and_site_variables(config_file, monkeypatch):
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    script = run_slurm(str(config_file), [], dry_run=True,
                       env=["NCCL_DEBUG=WARN", "NCCL_IB_GID_INDEX=3", "SOCKET_IFNAME=ib0", "NOTE=a b"])
    assert "export NCCL_IB_HCA=mlx5_0\n" in script  # from the submitting environment
    assert "export NCCL_DEBUG=WARN\n" in script and "NCCL_DEBUG=INFO" not in script  # --env wins
    for line in ["export NCCL_IB_GID_INDEX=3", "export SOCKET_IFNAME=ib0", "export NOTE='a b'"]:
        assert f"{line}\n" in script
    assert "UNRELATED_VARIABLE" not in script
    assert script.index("export NCCL_IB_HCA") < script.index("\nset -- ") < script.index("set -euo pipefail")


@pytest.mark.parametrize(
    "config, overrides, kwargs, message",
    [
        ("missing.yaml", [], {}, "config not found"),
        ("{config}", [], {"nodes": 0}, "--nodes"),
        ("{config}", [], {"time": "soon"}, "time limit"),
        ("{config}", [], {"cpus_per_task": -1}, "--cpus-per-task"),
        ("{config}", ["--bogus"], {}, "unknown option"),
        ("{config}", ["not-an-override"], {}, "override"),
        ("{config}", [], {"env": ["NO_EQUALS"]}, "invalid --env"),
        ("{config}", [], {"env": ["=x"]}, "invalid --env"),
        ("{config}", [], {"env": ["SLURM_JOB_ID=1"]}, "SLURM_"),
        ("{config}", [], {"output_dir": "my runs"}, "--output-dir"),
        ("{config}", ["train.lrr=1e-4"], {}, "did you mean 'train.lr'"),  # what training would refuse
        # an fsdp2 split the job's ranks cannot make: refused at submit, not when the job starts
        ("{config}", ["parallel.dp_replicate=3"], {"nodes": 8, "gpus_per_node": 8},
         "parallel.dp_replicate=3 x parallel.dp_shard=0 must multiply to the 64 ranks launched"),
        ("{config}", ["train.steps=many"], {}, "train.steps must be an integer"),
        ("{bad_config}", [], {}, "unknown config key 'trian'"),
    ],
)
def test_run_slurm_bad_input_is_a_one_line_error(
    config_file, tmp_path, monkeypatch, config, overrides, kwargs, message
):
    monkeypatch.chdir(tmp_path)
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("trian:\n  steps: 5\n")
    config = config.replace("{config}", str(config_file)).replace("{bad_config}", str(bad_config))
    with pytest.raises(SlurmError, match=message) as info:
        run_slurm(config, overrides, dry_run=True, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists(), "nothing submitted"


def test_run_slurm_without_sbatch_says_so(config_file, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SlurmError, match="sbatch not found"):
        run_slurm(str(config_file), [], output_dir=str(tmp_path / "runs"))


def test_run_slurm_submits_and_returns_the_job_line(config_file, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "sbatch", f'cp "$2" {tmp_path}/submitted.sbatch; echo "77;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    text = run_slurm(str(config_file), ["lora.r=4"], output_dir=str(tmp_path / "runs"), job_name="ld")
    assert text.startswith("submitted job 77: script ")
    assert text.rstrip("\n").endswith(f"log {tmp_path / 'runs' / 'logs'}/ld-77.out")
    (kept,) = (tmp_path / "runs").glob("ld-*.sbatch")
    assert kept.read_text() == (tmp_path / "submitted.sbatch").read_text()
    assert (tmp_path / "runs" / "logs").is_dir()


# ----------------------------------------------------------------- the CLI


def cli(argv: list[str]) -> int:
    """``lora-dist slurm ARGV``; an argparse error (SystemExit) counts as its exit code."""
    from lora_dist.cli import main

    try:
        return main(["slurm", *argv])
    except SystemExit as exit_:
        return exit_.code


def test_dry_run_prints_the_script(config_file, tmp_path, capsys):
    code = cli([str(config_file), "--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1-00:00",
                "--account", "acct", "--output-dir", str(tmp_path / "runs"), "--dry-run", "--", "train.lr=1e-4",
                "output.dir=runs/x y"])  # fmt: skip
    assert code == 0
    script = capsys.readouterr().out
    for line in ["--nodes=3", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00", "--account=acct",
                 f"--output={tmp_path / 'runs' / 'logs'}/%x-%j.out"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert f"set -- '{config_file}' train.lr=1e-4 'output.dir=runs/x y'\n" in script
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_options_may_come_before_or_after_the_config(config_file, capsys):
    for argv in (
        ["--nodes", "5", str(config_file), "--dry-run", "--", "lora.r=4"],
        [str(config_file), "--nodes", "5", "--dry-run", "--", "lora.r=4"],
        [str(config_file), "--dry-run", "lora.r=4", "--nodes=5"],
    ):
        assert cli(argv) == 0
        script = capsys.readouterr().out
        assert "#SBATCH --nodes=5\n" in script
        assert f"set -- '{config_file}' lora.r=4\n" in script


def test_env_option_exports_in_the_script(config_file, capsys):
    assert cli([str(config_file), "--dry-run", "--env", "NCCL_IB_HCA=mlx5_0", "lora.r=4", "--env", "NOTE=a b"]) == 0
    script = capsys.readouterr().out
    assert "export NCCL_IB_HCA=mlx5_0\n" in script and "export NOTE='a b'\n" in script
    assert f"set -- '{config_file}' lora.r=4\n" in script


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.yaml", "--dry-run"], "config not found"),
        (["{config}", "--nodes", "0", "--dry-run"], "--nodes"),
        (["{config}", "--time", "soon", "--dry-run"], "time limit"),
        (["{config}", "--dry-run", "--bogus"], "--bogus"),  # argparse's message: usage, then the error
        (["{config}", "--dry-run", "--", "not-an-override"], "override"),
        (["{config}", "--dry-run", "--env", "NO_EQUALS"], "invalid --env"),
        (["{config}", "--dry-run", "--", "lora.rank=8"], "did you mean 'lora.r'"),
    ],
)
def test_cli_errors_exit_2_with_a_message(config_file, capsys, argv, message):
    argv = [a.replace("{config}", str(config_file)) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lora-dist slurm: error:") and message in last
    if message != "--bogus":
        assert err.startswith("lora-dist slurm: error:") and err.count("\n") == 1, "one line"


def test_submit_without_sbatch_says_so(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli([str(config_file), "--output-dir", str(tmp_path / "runs")]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_submit_writes_the_script_and_returns_the_job_id(config_file, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "sbatch", f'cp "$2" {tmp_path}/submitted.sbatch; echo "77;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert cli([str(config_file), "--output-dir", str(tmp_path / "runs"), "--", "lora.r=4"]) == 0
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


# ----------------------------------------------------------------- launchers/mpirun.sh


@pytest.fixture
def mpirun(tmp_path):
    """run(version_text, **env) -> argv a stub MPIEXEC received from launchers/mpirun.sh."""
    argv_file = tmp_path / "mpiexec.argv"
    stub = tmp_path / "mpiexec"
    write_stub(stub, f'if [ "$1" = --version ]; then printf "%s\\n" "$FAKE_VERSION"; exit 0; fi\n'
                     f"printf '%s\\0' \"$@\" > {argv_file}\n")  # fmt: skip

    def run(version: str, **env: str) -> list[str]:
        environ = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MPIEXEC": str(stub), "FAKE_VERSION": version,
                   **env}  # fmt: skip
        proc = subprocess.run(["bash", str(REPO / "launchers" / "mpirun.sh"), "cfg.yaml", "a=two words"],
                              env=environ, capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return argv_file.read_text().split("\0")[:-1]

    return run


OPEN_MPI = "mpirun (Open MPI) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/"
MPICH = "HYDRA build details:\n    Version:                                 4.1.2"


def test_mpirun_forwards_cluster_settings_under_open_mpi(mpirun):
    site = {"NCCL_IB_HCA": "mlx5_0", "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/hf", "GLOO_SOCKET_IFNAME": "ib0", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500", "UCX_TLS": "rc", "MPI_FORWARD": "UCX_*"}  # fmt: skip
    argv = mpirun(OPEN_MPI, NOT_FORWARDED="x", NP="4", **site)
    forwarded = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
    assert forwarded == {*site} - {"MPI_FORWARD"} | {"PATH", "OMP_NUM_THREADS"}
    assert argv[:2] == ["-n", "4"]
    assert argv[-4:] == ["lora-dist", "train", "cfg.yaml", "a=two words"]


@pytest.mark.parametrize("version", [MPICH, "Intel(R) MPI Library for Linux* OS, Version 2021.10"])
def test_mpirun_relies_on_hydra_forwarding(mpirun, version):
    argv = mpirun(version, NCCL_IB_HCA="mlx5_0", HOSTFILE="hosts", PPN="8")
    assert "-x" not in argv
    assert argv == ["-n", "2", "-f", "hosts", "-ppn", "8", "lora-dist", "train", "cfg.yaml", "a=two words"]


def test_mpirun_flavor_can_be_forced(mpirun):
    assert "-x" in mpirun(MPICH, MPI_FLAVOR="openmpi")
    assert "-x" not in mpirun(OPEN_MPI, MPI_FLAVOR="mpich")


@pytest.mark.parametrize("template", ["multi_node.sbatch", "per_gpu_tasks.sbatch", "preemptible.sbatch"])
def test_every_template_derives_lora_dists_rendezvous_port(template):
    """The templates' port (bash) and lora_dist's own for an srun task without MASTER_PORT are one rule."""
    import re

    from lora_dist.launch.detect import slurm_port

    text = (Path(__file__).resolve().parents[1] / "slurm" / template).read_text()
    line = next(line for line in text.splitlines() if line.startswith("MASTER_PORT="))
    expression = re.fullmatch(r"MASTER_PORT=\$\{MASTER_PORT:-\$\(\((.*)\)\)\}", line).group(1)
    for job_id in (1, 4242, 11999, 12000, 987654):
        got = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; echo $(({expression}))"], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert int(got) == slurm_port(job_id), (template, job_id)
