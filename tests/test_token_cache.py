"""Tokenize once (issue 12, part 4): a memory-mapped cache built once, reused by restarts and every rank,
never trusted when partial or corrupt; memory stays bounded however large the data."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import lora_dist.token_cache as token_cache
from lora_dist.data import load_dataset
from lora_dist.demo import demo_texts, make_tokenizer
from lora_dist.sources import DataError, Source
from distutil import REPO, quiet_env, ranks

SEQ = 48


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t} if k % 2 else {"prompt": t[:12], "completion": t[12:]}) + "\n"
                            for k, t in enumerate(demo_texts(300, seed=7))))
    return path


@pytest.fixture
def chunks(monkeypatch):
    """How many chunks were tokenized (in-process: num_proc=1)."""
    calls = []
    real = token_cache._tokenize_chunk
    monkeypatch.setattr(token_cache, "_tokenize_chunk", lambda task: calls.append(1) or real(task))
    return calls


def same(a, b) -> bool:
    return all(x.numpy().tobytes() == y.numpy().tobytes() for x, y in
               zip((a.input_ids, a.labels, a.position_ids, a.lengths), (b.input_ids, b.labels, b.position_ids, b.lengths)))


def entries(cache):
    return [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_a_second_load_maps_the_cache_without_tokenizing(tok, data, tmp_path, chunks):
    cache = tmp_path / "cache"
    first = load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)
    assert len(chunks) > 0
    (entry,) = entries(cache)
    stamp = {f.name: f.stat().st_mtime_ns for f in entry.iterdir()}
    chunks.clear()
    again = load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)
    assert chunks == [] and same(first, again) and first.stats == again.stats
    assert {f.name: f.stat().st_mtime_ns for f in entry.iterdir()} == stamp
    assert not again.input_ids.numpy().flags.owndata  # a view of the memory map, not a copy


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so that a small file keeps several workers busy (the forked workers inherit it)."""
    real = token_cache.read_chunks
    monkeypatch.setattr(token_cache, "read_chunks", lambda source: real(source, 16))


def test_parallel_build_equals_in_process_build(tok, data, tmp_path, small_chunks):
    one = load_dataset(data, tok, SEQ, cache_dir=tmp_path / "a", num_proc=1, eval_fraction=0.1)
    three = load_dataset(data, tok, SEQ, cache_dir=tmp_path / "b", num_proc=3, eval_fraction=0.1)
    assert same(one, three) and one.stats == three.stats
    assert same(one.held_out, three.held_out) and one.held_out.stats == three.held_out.stats


def _workers_left() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "lora-dist-tokenize"]


def test_a_bad_record_in_a_worker_is_one_error_naming_its_line_and_ends_every_worker(tok, data, tmp_path,
                                                                                    small_chunks):
    """A worker's error reaches the rank, which ends its workers. (multiprocessing.Pool ended them with
    terminate(), in which a clean-clone CI run hung on a two-line file holding a bad record.)"""
    lines = data.read_text().splitlines(keepends=True)
    lines[100] = '{"oops": 1}\n'
    data.write_text("".join(lines))
    with pytest.raises(DataError, match=r"d\.jsonl:101\b"):
        load_dataset(data, tok, SEQ, cache_dir=tmp_path / "c", num_proc=2)
    assert _workers_left() == []
    assert not (tmp_path / "c").exists() or entries(tmp_path / "c") == []


def _die_on_the_third_chunk(task):
    if task[2][0][0] == 33:  # the third chunk of 16 rows starts at line 33
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_TOKENIZE(task)


_REAL_TOKENIZE = token_cache._tokenize_chunk


def test_a_worker_that_dies_is_an_error_naming_its_exit_code_not_a_wait(tok, data, tmp_path, small_chunks,
                                                                       monkeypatch):
    monkeypatch.setattr(token_cache, "_tokenize_chunk", _die_on_the_third_chunk)
    with pytest.raises(DataError, match=r"a tokenization worker died \(exit code -9\) tokenizing a chunk of "
                                        r".*d\.jsonl; if memory ran out, lower data\.num_proc"):
        load_dataset(data, tok, SEQ, cache_dir=tmp_path / "c", num_proc=2)
    assert _workers_left() == []


def test_workers_that_do_not_start_leave_the_rank_to_tokenize_by_itself(tok, data, tmp_path, small_chunks,
                                                                        monkeypatch, caplog):
    """A worker forked while another thread held a lock can wait for it forever (a CI run hung in a build that
    never logged): workers that do not start in time are ended and the rank tokenizes the same blocks itself."""
    rank, real = os.getpid(), token_cache._init_worker

    def stuck_in_a_worker(*args):
        if os.getpid() != rank:
            time.sleep(600)
        real(*args)

    monkeypatch.setattr(token_cache, "_init_worker", stuck_in_a_worker)
    monkeypatch.setattr(token_cache, "START_TIMEOUT_S", 2.0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="lora_dist.token_cache"):
        built = load_dataset(data, tok, SEQ, cache_dir=tmp_path / "a", num_proc=2)
    assert time.monotonic() - started < 60
    assert "2 of 2 tokenization workers did not start within 2 s; tokenizing in this process" in caplog.text
    assert _workers_left() == []
    assert same(built, load_dataset(data, tok, SEQ, cache_dir=tmp_path / "b", num_proc=1))


def test_a_worker_that_died_between_chunks_is_the_same_error(tok, data):
    tasks = token_cache._tasks([Source(str(data))])
    with token_cache._Workers(2, tok, None, "all_assistant") as workers:
        os.kill(workers.procs[0].pid, signal.SIGKILL)
        workers.procs[0].join()
        with pytest.raises(DataError, match=r"a tokenization worker died \(exit code -9\) tokenizing a chunk of "):
            list(workers.map(tasks))
    assert _workers_left() == []


def test_a_consumer_that_stops_early_ends_every_worker(tok, data, small_chunks):
    tasks = token_cache._tasks([Source(str(data))])
    with token_cache._Workers(2, tok, None, "all_assistant") as workers:
        results = workers.map(tasks)
        part, first = next(results)
        assert part == "train" and len(first[3]) == 16  # the first chunk's 16 documents
        results.close()
    assert _workers_left() == []


def _signal_handlers(task):
    return tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2))


def test_a_worker_dies_on_sigterm_and_leaves_stop_signals_to_its_rank(tok, monkeypatch):
    """A forked worker would inherit the rank's stop handlers (lora_dist.preemption), which only set a flag: a
    SIGTERM could not end it. A worker dies on SIGTERM and ignores Ctrl-C, SIGUSR1 and SIGUSR2, which a job
    step or a terminal sends every process: the rank acts on them, and ends its workers."""
    from lora_dist.preemption import PreemptionHandler

    monkeypatch.setattr(token_cache, "_tokenize_chunk", _signal_handlers)
    with PreemptionHandler(), token_cache._Workers(1, tok, None, "all_assistant") as workers:
        ((_, handlers),) = list(workers.map([("train", ("x.jsonl", "jsonl", []))]))
    assert handlers == (signal.SIG_DFL, signal.SIG_IGN, signal.SIG_IGN, signal.SIG_IGN)
    assert _workers_left() == []


@pytest.mark.parametrize("damage", ["truncate", "truncate_held_out", "meta", "missing_file", "other_key"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tok, data, tmp_path, chunks, damage):
    cache = tmp_path / "cache"
    ref = load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1, eval_fraction=0.1)
    ref_bytes = ref.input_ids.numpy().tobytes() + ref.held_out.labels.numpy().tobytes()
    (entry,) = entries(cache)
    if damage.startswith("truncate"):
        with (entry / f"{'eval_' if damage == 'truncate_held_out' else ''}labels.bin").open("r+b") as f:
            f.truncate(100)
    elif damage == "meta":
        (entry / "meta.json").write_text('{"format": 1, "key": "')
    elif damage == "missing_file":
        (entry / "position_ids.bin").unlink()
    else:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps(meta | {"key": "0" * 32}))
    chunks.clear()
    rebuilt = load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1, eval_fraction=0.1)
    assert len(chunks) > 0
    assert rebuilt.input_ids.numpy().tobytes() + rebuilt.held_out.labels.numpy().tobytes() == ref_bytes
    assert token_cache.open_entry(entry, entry.name) is not None


def test_a_killed_build_leaves_nothing_that_is_trusted(tok, data, tmp_path, chunks, monkeypatch):
    cache = tmp_path / "cache"
    real = token_cache._tokenize_chunk

    def dies(task):
        raise KeyboardInterrupt  # a kill mid-build
    monkeypatch.setattr(token_cache, "_tokenize_chunk", dies)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)
    assert entries(cache) == [] and list(cache.iterdir()) == []  # the staging dir went too
    monkeypatch.setattr(token_cache, "_tokenize_chunk", real)
    assert len(load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)) > 0


def _build_killed_at_the_second_chunk(data, tok, cache) -> None:
    calls = []
    real = token_cache._tokenize_chunk

    def tokenize(task):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no finally runs: the staging dir stays
        return real(task)

    token_cache._tokenize_chunk = tokenize
    load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)


def _killed_build(data, tok, cache):
    child = multiprocessing.get_context("fork").Process(target=_build_killed_at_the_second_chunk,
                                                        args=(data, tok, cache))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    (dead,) = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert any(dead.iterdir())  # a partial build
    return dead, dead.name[1:dead.name.index(".tmp-")], dead.with_name(dead.name.replace(".tmp-", ".writer-"))


def test_the_staging_dir_of_a_build_killed_outright_is_removed_by_the_next_run(tok, data, tmp_path, small_chunks):
    """A build SIGKILLed (Slurm after KillWait, the OOM killer) left its staging dir, as large as the entry, in the
    cache dir for good. Its mark is free and names this host, so the next run removes it, whether it builds the
    entry or finds it built; a live build's (a mark held here) is left alone."""
    from lora_dist.atomic import WriterMark

    cache = tmp_path / "cache"
    dead, key, _ = _killed_build(data, tok, cache)
    live = WriterMark(cache / key)
    try:
        assert len(load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)) > 0  # builds
        assert not dead.exists() and live.staging.is_dir()
        assert sorted(p.name for p in cache.iterdir()) == sorted([key, live.staging.name, live.path.name])
    finally:
        live.staging.rmdir()
        live.release()
    assert [p.name for p in cache.iterdir()] == [key]
    dead, _, _ = _killed_build(data, tok, cache.with_name("other"))  # the same entry, built elsewhere meanwhile
    shutil.move(dead, cache / dead.name)
    shutil.move(dead.with_name(dead.name.replace(".tmp-", ".writer-")), cache)
    load_dataset(data, tok, SEQ, cache_dir=cache, num_proc=1)  # finds the entry built
    assert [p.name for p in cache.iterdir()] == [key]


def test_another_hosts_killed_build_is_removed_once_idle_and_a_live_one_keeps_its_mark_fresh(tok, data, tmp_path,
                                                                                           small_chunks):
    """Where locks are node-local (NFS nolock, Lustre localflock) a free mark made on another host may be a live
    build's there: its staging dir is removed only once nothing in it or its mark changed for ABANDONED_AFTER_S,
    and a live build touches its mark every tenth of that."""
    from lora_dist.atomic import WriterMark

    cache = tmp_path / "cache"
    dead, key, mark = _killed_build(data, tok, cache)
    mark.write_text("another-host 0000\n")
    (cache / key).mkdir()  # a build of the entry happens: its sweep looks first
    token_cache.sweep_killed_builds(cache / key)
    assert dead.is_dir()  # young: a live build on that host, for all this host can tell
    idle = time.time() - token_cache.ABANDONED_AFTER_S - 1
    for path in (mark, dead, *dead.iterdir()):
        os.utime(path, (idle, idle))
    token_cache.sweep_killed_builds(cache / key)
    assert not dead.exists() and not mark.exists()
    live = WriterMark(cache / key, heartbeat_s=0.05)
    try:
        os.utime(live.path, (idle, idle))
        time.sleep(0.5)
        assert time.time() - live.path.stat().st_mtime < 1
    finally:
        live.staging.rmdir()
        live.release()
    assert not live.path.exists()


def test_what_the_blocks_depend_on_is_in_the_key(tok, data, tmp_path):
    cache = tmp_path / "cache"
    base = load_dataset(data, tok, SEQ, cache_dir=cache)
    load_dataset(data, tok, SEQ + 1, cache_dir=cache)
    load_dataset(data, tok, SEQ, cache_dir=cache, packing=False)
    load_dataset(data, tok, SEQ, cache_dir=cache, loss_on="last_assistant")
    other_tok = make_tokenizer()
    other_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    load_dataset(data, other_tok, SEQ, cache_dir=cache)
    load_dataset(data, tok, SEQ, cache_dir=cache, eval_fraction=0.1)
    assert len(entries(cache)) == 6
    with data.open("a") as f:  # the data changes: a new entry, the new record in it
        f.write(json.dumps({"text": "one more record"}) + "\n")
    grown = load_dataset(data, tok, SEQ, cache_dir=cache)
    assert len(entries(cache)) == 7 and grown.stats.documents == base.stats.documents + 1


def test_the_key_does_not_change_once_the_tokenizer_has_been_used(data, tmp_path):
    """transformers turns a saved tokenizer.json's truncation (and padding) off at the first encode, which changed
    ``backend_tokenizer.to_str()``: a rank that had tokenized (rank 0, data.path in-process) then keyed
    data.eval_path's entry differently from the ranks that had not, and they looked for different entries."""
    from transformers import AutoTokenizer

    from lora_dist.sources import parse_sources

    saved = make_tokenizer()
    saved.backend_tokenizer.enable_truncation(max_length=512)
    saved.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["truncation"] is not None
    used, fresh = (AutoTokenizer.from_pretrained(tmp_path / "tok") for _ in range(2))
    before = token_cache.tokenizer_fingerprint(used)
    used("hello world", add_special_tokens=False)
    assert used.backend_tokenizer.truncation is None  # what transformers does at the first encode
    assert token_cache.tokenizer_fingerprint(used) == before == token_cache.tokenizer_fingerprint(fresh)
    sources = parse_sources(str(data))
    assert (token_cache.cache_key(sources, used, None, "all_assistant", SEQ, True, 0)
            == token_cache.cache_key(sources, fresh, None, "all_assistant", SEQ, True, 0))


def test_a_tokenizer_setting_outside_its_serialized_model_is_in_the_key(data, tmp_path):
    """tokenizer_config.json's split_special_tokens changes the ids of every special token a text holds (a chat
    template writes them as text), not tokenizer.json: a cache built before the setting changed is not reused."""
    from transformers import AutoTokenizer

    make_tokenizer().save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")
    split = AutoTokenizer.from_pretrained(tmp_path / "tok", split_special_tokens=True)
    eos = plain.eos_token
    assert plain(eos, add_special_tokens=False)["input_ids"] != split(eos, add_special_tokens=False)["input_ids"]
    assert plain.backend_tokenizer.to_str() == split.backend_tokenizer.to_str()  # what the key held before
    cache = tmp_path / "cache"
    load_dataset(data, plain, SEQ, cache_dir=cache)
    reloaded = load_dataset(data, split, SEQ, cache_dir=cache)
    assert len(entries(cache)) == 2
    assert same(reloaded, load_dataset(data, split, SEQ, cache_dir=tmp_path / "fresh"))


BOUNDED = textwrap.dedent("""
    import json, resource, sys
    from lora_dist.data import load_dataset
    from lora_dist.demo import make_tokenizer
    tok = make_tokenizer()
    tok("warm up")
    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(sys.argv[1], "w") as f:  # the data: written a line at a time
        for k in range(int(sys.argv[3])):
            f.write(json.dumps({"text": f"record {k}: the red fox builds wooden boats near the harbour " * 2}) + "\\n")
    base = peak_kb()
    ds = load_dataset(sys.argv[1], tok, 64, cache_dir=sys.argv[2], num_proc=1, verbose=False)
    cached = sum(t.numel() * t.element_size() for t in (ds.input_ids, ds.labels, ds.position_ids, ds.lengths))
    print(json.dumps({"growth": (peak_kb() - base) * 1024, "cached": cached, "blocks": len(ds)}))
""")


def test_memory_stays_bounded_on_data_larger_than_the_budget(tmp_path):
    """100k records make ~80 MB of blocks; the loading process's peak RSS grows by a small fraction of that
    (today's code held every token as Python ints: several times the blocks' size)."""
    script = tmp_path / "bounded.py"
    script.write_text(BOUNDED)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "big.jsonl"), str(tmp_path / "cache"), "100000"],
                          cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cached"] > 60e6
    assert result["growth"] < 0.25 * result["cached"], result


SHARED = textwrap.dedent("""
    import hashlib, json, sys
    import torch.distributed as dist
    import lora_dist.token_cache as tc
    from lora_dist.config import load_config
    from lora_dist.data import load_splits
    from lora_dist.demo import make_tokenizer
    dist.init_process_group("gloo")
    calls = []
    real = tc._tokenize_chunk
    tc._tokenize_chunk = lambda task: calls.append(1) or real(task)
    cfg = load_config(None, [f"data.path={sys.argv[1]}", f"data.cache_dir={sys.argv[2]}", "data.num_proc=1",
                             "train.seq_len=48", "data.eval_fraction=0.1"])
    train, held_out = load_splits(cfg, make_tokenizer())
    digest = hashlib.sha256(train.input_ids.numpy().tobytes() + held_out.labels.numpy().tobytes()).hexdigest()
    out = {"rank": dist.get_rank(), "chunks": len(calls), "digest": digest, "blocks": [len(train), len(held_out)]}
    with open(f"{sys.argv[3]}.{dist.get_rank()}", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_two_ranks_share_one_build(tok, data, tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    cache = tmp_path / "cache"
    ranks(2, str(script), str(data), str(cache), str(tmp_path / "out"))
    per_rank = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert per_rank[0]["chunks"] > 0 and per_rank[1]["chunks"] == 0  # rank 0 built, rank 1 only mapped
    assert per_rank[0]["digest"] == per_rank[1]["digest"] and per_rank[0]["blocks"] == per_rank[1]["blocks"]
    assert len(entries(cache)) == 1
    single = load_dataset(data, tok, 48, cache_dir=tmp_path / "single", num_proc=1).split(0.1)
    assert per_rank[0]["blocks"] == [len(single[0]), len(single[1])]


APART = textwrap.dedent("""
    import hashlib, json, sys
    import torch.distributed as dist
    from lora_dist.config import load_config
    from lora_dist.data import load_splits
    from lora_dist.demo import make_tokenizer
    from lora_dist.sources import DataError
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, [f"data.path={sys.argv[1 + rank]}", f"data.cache_dir={sys.argv[3]}", "data.num_proc=1",
                             "train.seq_len=48"])
    try:
        train, _ = load_splits(cfg, make_tokenizer())
        out = {"digest": hashlib.sha256(train.input_ids.numpy().tobytes()).hexdigest()}
    except DataError as e:
        out = {"error": str(e)}
    with open(f"{sys.argv[4]}.{rank}", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_nodes_that_key_their_data_apart_must_still_hold_the_same_blocks(data, tmp_path):
    """Each node reads its own copy of the data (rank 1 stands for another node: its own file). A copy with another
    mtime keys apart but tokenizes to the same blocks: accepted. A copy that differs would train each node on other
    data without a word: refused in one line on every rank, naming the rank."""
    script = tmp_path / "apart.py"
    script.write_text(APART)
    copy, other = tmp_path / "copy.jsonl", tmp_path / "other.jsonl"
    shutil.copyfile(data, copy)
    os.utime(copy, ns=(1, 1))
    other.write_text(data.read_text() + json.dumps({"text": "one more record"}) + "\n")

    def run(theirs, name):
        ranks(2, str(script), str(data), str(theirs), str(tmp_path / "cache"), str(tmp_path / name))
        return [json.loads((tmp_path / f"{name}.{r}").read_text()) for r in (0, 1)]

    same_blocks = run(copy, "copy")
    assert "digest" in same_blocks[0] and same_blocks[0] == same_blocks[1]
    refused = run(other, "other")
    for out in refused:
        assert out["error"].startswith("rank 1 (host ") and "tokenized other blocks than rank 0" in out["error"]
        assert "\n" not in out["error"]


SLOW_BUILD = textwrap.dedent("""
    import json, sys, time
    import torch.distributed as dist
    import lora_dist.token_cache as tc
    from lora_dist.config import load_config
    from lora_dist.data import load_splits
    from lora_dist.demo import make_tokenizer
    from lora_dist.launch import init_distributed
    init_distributed(timeout_s=2)  # parallel.timeout_s=2
    real = tc.build
    tc.build = lambda *a: time.sleep(6) or real(*a)  # rank 0's build outlasts the group's timeout 3 times
    cfg = load_config(None, [f"data.path={sys.argv[1]}", f"data.cache_dir={sys.argv[2]}", "data.num_proc=1",
                             "train.seq_len=48", "data.eval_fraction=0.1"])
    train, held_out = load_splits(cfg, make_tokenizer())
    with open(f"{sys.argv[3]}.{dist.get_rank()}", "w") as f:
        json.dump([len(train), len(held_out)], f)
    dist.barrier()  # the default group still works, its timeout unchanged
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_the_other_ranks_wait_for_a_build_longer_than_the_groups_timeout(data, tmp_path):
    """A build takes what it takes (a large dataset: many minutes); the waiting ranks are not bound by
    parallel.timeout_s (before: they failed with a gloo timeout after it)."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_BUILD)
    ranks(2, str(script), str(data), str(tmp_path / "cache"), str(tmp_path / "out"))
    blocks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert blocks[0] == blocks[1] and blocks[0][0] > 0

