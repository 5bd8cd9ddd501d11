"""``lora-dist bench --launcher fork``: each configuration's ranks are forked from the bench's process. A launch
reports its ranks' failures and timeouts as torchrun does, and the launcher refuses a CUDA host in one line.
(Every configuration measured with it: tests/bench/test_bench_quick.py.)"""

from __future__ import annotations

import os
import time

import pytest

from lora_dist.bench import run


@pytest.fixture
def forks(monkeypatch):
    """The launcher with the work of its forks replaced (``behave(rank, args)``), without the preload's imports."""
    monkeypatch.setattr(run, "WORKER_IMPORTS", ())
    monkeypatch.setattr(run, "GRACE_S", 0.5)

    def use(behave):
        def fake_run(args):
            print(f"rank {os.environ.get('RANK', '-')} of {os.environ.get('WORLD_SIZE', '-')}: {args}", flush=True)
            behave(int(os.environ.get("RANK", "0")), args)

        monkeypatch.setattr(run, "_run_worker", fake_run)
    return use


def test_every_rank_runs_with_a_launch_by_hand_and_its_output_in_the_log(forks, tmp_path):
    forks(lambda rank, args: None)
    log = tmp_path / "log.txt"
    assert run._fork_launch(["job.json"], log, 2, timeout_s=30) == 0
    lines = sorted(log.read_text().splitlines())
    assert lines == ["rank 0 of 2: ['job.json']", "rank 1 of 2: ['job.json']"]


def test_one_plain_process_sees_no_launch(forks, tmp_path):
    forks(lambda rank, args: None)
    log = tmp_path / "log.txt"
    assert run._fork_launch(["merge", "a"], log, 0, timeout_s=30) == 0
    assert log.read_text().splitlines() == ["rank - of -: ['merge', 'a']"]


def test_a_failed_rank_fails_the_launch_and_its_waiting_peer_is_stopped(forks, tmp_path):
    def behave(rank, args):
        if rank == 0:
            raise RuntimeError("no such model")
        time.sleep(60)  # a peer left waiting for rank 0 (a barrier that would wait out its timeout)

    forks(behave)
    log = tmp_path / "log.txt"
    t0 = time.monotonic()
    assert run._fork_launch(["job.json"], log, 2, timeout_s=60) == 1
    assert time.monotonic() - t0 < 20  # the grace period, not the peer's minute
    assert "RuntimeError: no such model" in log.read_text()


def test_a_launch_past_its_timeout_is_stopped_and_says_so(forks, tmp_path):
    forks(lambda rank, args: time.sleep(60))
    t0 = time.monotonic()
    assert run._fork_launch(["job.json"], tmp_path / "log.txt", 2, timeout_s=1) == "timeout"
    assert time.monotonic() - t0 < 20


def test_an_exit_code_is_the_launchs(forks, tmp_path):
    def behave(rank, args):
        raise SystemExit(3 if rank == 1 else 0)

    forks(behave)
    assert run._fork_launch(["job.json"], tmp_path / "log.txt", 2, timeout_s=30) == 1


def test_a_cuda_host_is_refused_in_one_line(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:
        run._fork_launch(["job.json"], tmp_path / "log.txt", 2, timeout_s=30)
    message = str(e.value)
    assert "\n" not in message and "CPU only" in message and "--launcher torchrun" in message
