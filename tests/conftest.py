"""Shared test fixtures.

Models are tiny Hugging Face checkpoints built from a config by
:func:`lora_dist.demo.make_tiny_checkpoint`, saved with ``save_pretrained``
into a session temp dir and loaded back like real checkpoints; nothing is
downloaded. Keep this file generic: fixtures specific to one test module
belong in that module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch

#: Small enough that the whole suite stays fast on two CPU cores.
TINY_SIZES = {"hidden": 32, "layers": 2, "heads": 4}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


_quiet_transformers()


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    """Every test, and every process it starts, caches tokenized data in a session temp dir, never in the
    user's ``~/.cache/lora_dist/tokens``."""
    path = tmp_path_factory.mktemp("token-cache")
    os.environ["LORA_DIST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch="llama", **kwargs) -> Path`` of a saved tiny checkpoint.

    Built once per session per distinct arguments (``kwargs`` go to
    ``make_tiny_checkpoint``: ``hidden``, ``layers``, ``seed``, ``dtype``,
    ``max_shard_size``...). Treat the directory as read-only.
    """
    from lora_dist.demo import make_tiny_checkpoint

    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        options = {**TINY_SIZES, **kwargs}
        key = (arch, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **options)
        return cache[key]

    return make


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A checkpoint loaded with transformers (masked LM for BERT, causal LM otherwise), in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = transformers.AutoModelForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture
def tiny_model(tiny_checkpoint) -> Callable[..., torch.nn.Module]:
    """``tiny_model(arch="llama", **kwargs)``: a fresh fp32 model in eval mode, loaded from :func:`tiny_checkpoint`.

    Each call loads a new, independent copy (same weights for the same arguments).
    """

    def make(arch: str = "llama", **kwargs) -> torch.nn.Module:
        return load_hf_model(tiny_checkpoint(arch, **kwargs))

    return make


@pytest.fixture
def token_ids() -> Callable[..., torch.Tensor]:
    """``token_ids(model, batch=2, seq=16, seed=0)``: a deterministic batch of ids valid for ``model``."""

    def make(model: torch.nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)

    return make


@pytest.fixture
def peft_twin() -> Callable[..., torch.nn.Module]:
    """``peft_twin(base_model, lora_model, **lora_config_kwargs)``: PEFT's LoRA on ``base_model`` with our weights.

    ``base_model`` is a separately loaded copy of the same checkpoint, ``lora_model``
    a model injected by :func:`lora_dist.lora.inject_lora`. PEFT adapts exactly the
    modules ours adapts, with each module's rank/alpha and our A/B copied in, so the
    two must compute the same function. ``lora_config_kwargs`` go to
    ``peft.LoraConfig`` (e.g. ``use_rslora=True``).
    """
    import peft

    from lora_dist.lora import lora_modules

    def make(base_model: torch.nn.Module, lora_model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        layers = dict(lora_modules(lora_model))
        first = next(iter(layers.values()))
        kwargs.setdefault("r", first.r)
        kwargs.setdefault("lora_alpha", first.alpha)
        kwargs.setdefault("use_rslora", first.use_rslora)
        kwargs.setdefault("fan_in_fan_out", first.fan_in_fan_out)
        exact = {n: f"^{re.escape(n)}" for n in layers}
        kwargs.setdefault("rank_pattern", {exact[n]: m.r for n, m in layers.items() if m.r != kwargs["r"]})
        kwargs.setdefault(
            "alpha_pattern", {exact[n]: m.alpha for n, m in layers.items() if m.alpha != kwargs["lora_alpha"]}
        )
        kwargs.setdefault("target_modules", "^(" + "|".join(map(re.escape, layers)) + ")$")
        model = peft.get_peft_model(base_model, peft.LoraConfig(**kwargs)).eval()
        with torch.no_grad():
            for name, layer in layers.items():
                twin = model.base_model.model.get_submodule(name)
                twin.lora_A["default"].weight.copy_(layer.lora_A.weight)
                twin.lora_B["default"].weight.copy_(layer.lora_B.weight)
        return model

    return make


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kb)``: a tmpfs of that size, a real ENOSPC (not a patched write)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(kb: int) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("mount -t tmpfs is not permitted here")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def close_fails(monkeypatch):
    """``close_fails()``: from then on a safetensors file lora_dist writes fails only at its close, with EIO (how
    NFS reports a write it could not complete). Returns the list of the files whose close failed."""
    import builtins
    import errno

    from lora_dist import safetensors_file

    failed: list[str] = []

    class _FailsAtClose:
        def __init__(self, f) -> None:
            self._f = f

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.close()

        def close(self) -> None:
            self._f.close()
            failed.append(Path(self._f.name).name)
            raise OSError(errno.EIO, "Input/output error")

    def open_(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FailsAtClose(f) if str(path).endswith(".safetensors") and "w" in mode else f

    def arm() -> list[str]:
        monkeypatch.setattr(safetensors_file, "open", open_, raising=False)
        return failed

    return arm


# ----------------------------------------------------------------------------- the `slow` tier

#: A call that starts processes (a CLI run, torchrun, an example script, a Slurm job) or trains a model
#: in one: what makes a test take seconds rather than milliseconds on these machines.
_STARTS_WORK = re.compile(r"\b(lora_dist|torchrun|ranks|python|srun|sbatch|run_demo|train|subprocess\.(run|Popen|check_\w+))\(")


_TESTS = str(Path(__file__).parent)


def _starts_work(function, depth: int = 2) -> bool:
    """Whether ``function``, or a helper of its module it calls (``depth`` levels down), starts work."""
    import inspect

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if _STARTS_WORK.search(source):
        return True
    names = getattr(function, "__globals__", {})
    helpers = [names.get(n) for n in set(re.findall(r"\b([A-Za-z_]\w*)\(", source))]
    return depth > 0 and any(
        inspect.isfunction(h) and h is not function and h.__code__.co_filename.startswith(_TESTS)
        and _starts_work(h, depth - 1) for h in helpers
    )


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that launches processes (``dist``, ``cluster``) or whose body or fixtures start
    them or train (:data:`_STARTS_WORK`), so ``pytest -m "not slow"`` is the quick tier for editing loops
    (docs/testing.md). The mark follows the code: a new test that launches torchrun is slow without a list."""
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            functions += [d.func for d in defs if not d.argname.startswith(("tmp_path", "monkeypatch", "capsys"))]
        if item.get_closest_marker("dist") or item.get_closest_marker("cluster") or \
                any(f is not None and _starts_work(f) for f in functions):
            item.add_marker(pytest.mark.slow)
    _heavy_groups_first(items)


def _worker_group(nodeid: str) -> str:
    """The tests one pytest-xdist worker runs together: a module's (its module-scoped fixtures, a trained run or
    a built model, are made once), or every cluster test (one worker holds the cluster for the session,
    tests/cluster/conftest.py)."""
    return "tests/cluster" if nodeid.startswith("tests/cluster/") else nodeid.split("::")[0]


#: Seconds each worker group took (``scripts/test.sh --record-durations`` updates the groups a run ran).
DURATIONS = Path(__file__).parent / "durations.json"


def _heavy_groups_first(items) -> None:
    """The longest groups first (by :data:`DURATIONS`; a group it does not know is estimated from its slow and
    multi-process tests), so under ``pytest -n N`` (scripts/test.sh) no long group starts last while the
    other worker idles. Stable: collection order within a group."""
    import json

    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    estimate: dict[str, float] = {}
    for item in items:
        name = _worker_group(item.nodeid)
        seconds = (4 if item.get_closest_marker("slow") else 0.05) + (8 if item.get_closest_marker("dist") else 0)
        estimate[name] = estimate.get(name, 0) + seconds
    cost = {name: known.get(name, seconds) for name, seconds in estimate.items()}
    items.sort(key=lambda item: -cost[_worker_group(item.nodeid)])


# ----------------------------------------------------------------------------- skips in CI

#: ``LORA_DIST_STRICT_SKIPS=1`` (.ci/run): a test that skips fails instead. The skips for what a machine lacks (root
#: to mount a tmpfs, Slurm's tools, a resolvable hostname...) are right on a developer's machine, but CI's machine has
#: all of it: there a skip would turn the only test of a path green without running it.
STRICT_SKIPS = os.environ.get("LORA_DIST_STRICT_SKIPS") == "1"


def _fail_a_skip(report) -> None:
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where no test may skip (LORA_DIST_STRICT_SKIPS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_a_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips as it is collected (``allow_module_level``, an ``importorskip`` at the top)."""
    outcome = yield
    _fail_a_skip(outcome.get_result())


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help=f"record the seconds each worker group took in {DURATIONS.name} (the scheduling order); "
                          "run the whole suite with it, a selection records partial times")


_group_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    name = _worker_group(report.nodeid)
    _group_seconds[name] = _group_seconds.get(name, 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("record_durations") and not hasattr(session.config, "workerinput"):
        import json

        groups = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        groups.update((k, round(v, 1)) for k, v in _group_seconds.items())  # the groups this run ran
        ordered = dict(sorted(groups.items(), key=lambda kv: -kv[1]))
        DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n")


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pragma: no cover - xdist is in the test extra
    LoadScopeScheduling = None
else:
    class _GroupScheduling(LoadScopeScheduling):
        """pytest-xdist's by-module scheduling, with every cluster test in one group (:func:`_worker_group`)."""

        def _split_scope(self, nodeid: str) -> str:
            return _worker_group(nodeid)

    @pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist: no such hook
    def pytest_xdist_make_scheduler(config, log):
        config.option.loadscopereorder = False  # keep _heavy_groups_first's order, not xdist's by test count
        return _GroupScheduling(config, log)
