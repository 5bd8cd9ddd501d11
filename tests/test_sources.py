"""Data sources (issue 12, part 3): .jsonl, .parquet and save_to_disk dirs give byte-identical blocks;
mixtures with weights; a validation path of its own; one-line errors for what cannot be read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from lora_dist.config import ConfigError, load_config
from lora_dist.data import IGNORE, DataError, load_dataset, load_splits
from lora_dist.demo import demo_texts, make_tokenizer
from lora_dist.sources import copies
from test_chat import qwen3_tokenizer

SEQ = 64


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # datasets must write nothing there
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def records(n: int = 60, seed: int = 3) -> list[dict]:
    """Every record format, in one file (arrow gives them one schema: missing fields become nulls)."""
    rows = []
    for k, text in enumerate(demo_texts(n, seed=seed)):
        kind = k % 4
        if kind == 0:
            rows.append({"messages": [{"role": "user", "content": text[:20]}, {"role": "assistant", "content": text}]})
        elif kind == 1:
            rows.append({"prompt": text[:15], "completion": text[15:]})
        elif kind == 2:
            rows.append({"instruction": text[:10], "output": text[10:]} | ({"input": "ctx"} if k % 8 == 2 else {}))
        else:
            rows.append({"text": text * (1 + k % 5)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arrays(ds) -> list[np.ndarray]:
    return [t.numpy() for t in (ds.input_ids, ds.labels, ds.position_ids, ds.lengths)]


def assert_same_blocks(a, b):
    for x, y in zip(arrays(a), arrays(b)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert a.stats == b.stats


@pytest.fixture
def same_data(tmp_path):
    """The same records as JSON Lines, parquet and a save_to_disk dir, converted the way users convert."""
    import datasets

    jsonl = write_jsonl(tmp_path / "data" / "d.jsonl", records()) if (tmp_path / "data").mkdir() is None else None
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "hf_build"))
    ds.to_parquet(str(tmp_path / "data" / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "data" / "saved"))
    return tmp_path / "data"


@pytest.mark.parametrize("packing", [True, False])
def test_jsonl_parquet_and_save_to_disk_give_byte_identical_blocks(tok, same_data, tmp_path, packing):
    before = sorted(p.relative_to(same_data) for p in same_data.rglob("*"))
    ref = load_dataset(same_data / "d.jsonl", tok, SEQ, packing=packing, chat_template="chatml", num_proc=1)
    assert ref.stats.records == {"messages": 15, "completion": 15, "alpaca": 15, "text": 15}
    for other in ("d.parquet", "saved"):
        assert_same_blocks(ref, load_dataset(same_data / other, tok, SEQ, packing=packing, chat_template="chatml",
                                             num_proc=1))
    assert sorted(p.relative_to(same_data) for p in same_data.rglob("*")) == before  # nothing left next to the data
    assert not (tmp_path / "hf_home").exists()  # nor in the datasets cache


def test_a_parquet_record_error_names_its_row(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "fine", "question": None}, {"text": None, "question": "x"}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 1: expected a \"text\" field.*got keys \['question'\]") as e:
        load_dataset(tmp_path / "d.parquet", tok, SEQ)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("setup, match", [
    (lambda p: "org/some-dataset", r"not found; .*local files only: save the hub dataset first"),
    (lambda p: str(p / "missing.parquet"), r"missing.parquet' not found; point data.path at a .jsonl/.json, .parquet"),
    (lambda p: (p / "d.csv").write_text("a") and str(p / "d.csv"), r"unsupported file type '.csv'"),
    (lambda p: (p / "dir").mkdir() or str(p / "dir"), r"not one written by datasets' save_to_disk"),
    (lambda p: (p / "snap" / "data").mkdir(parents=True) or (p / "snap/data/train-00000-of-00002.parquet").touch()
     or (p / "snap/data/train-00001-of-00002.parquet").touch() or str(p / "snap"),
     r"snap is a dir of 2 data files, .*; list the files as a mixture: "
     r"data.path=\[.*snap/data/train-00000-of-00002.parquet, .*train-00001-of-00002.parquet\]$"),
    (lambda p: (p / "dd" / "train").mkdir(parents=True) or (p / "dd" / "test").mkdir() or
     (p / "dd" / "dataset_dict.json").write_text("{}") and str(p / "dd"),
     r"holds a DatasetDict \(splits test, train\); point the path at one split's dir, e.g. .*dd/train$"),
    (lambda p: (p / "bad.parquet").write_bytes(b"not parquet") and str(p / "bad.parquet"),
     r"bad.parquet: cannot be read as parquet"),
    (lambda p: (p / "u16.jsonl").write_text('{"text": "caf\u00e9"}\n', encoding="utf-16") and str(p / "u16.jsonl"),
     r"u16.jsonl: UTF-16 text; convert the file to UTF-8 \(e.g. iconv -f utf-16 -t utf-8\)"),
])
def test_what_cannot_be_read_is_one_line(tok, tmp_path, setup, match):
    with pytest.raises(DataError, match=match) as e:
        load_dataset(setup(tmp_path), tok, SEQ)
    assert "\n" not in str(e.value)


def test_mixture_weights_repeat_and_subsample_records_as_documented(tok, tmp_path):
    """weight 2: every record twice (two passes over the source); 0.5: about half its records, the same ones on
    every run; sources in the order listed. The reference is the file those rules write by hand."""
    a = [{"text": t} for t in demo_texts(30, seed=1)]
    b = [{"prompt": t[:10], "completion": t[10:]} for t in demo_texts(400, seed=2)]
    pa, pb = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)
    kept = [row for line, row in enumerate(b, 1) if copies(0.5, 1, line) > 0]
    assert 150 < len(kept) < 250  # about half
    ref = load_dataset(write_jsonl(tmp_path / "ref.jsonl", a + a + kept), tok, SEQ)
    mix = [{"path": str(pa), "weight": 2}, {"path": str(pb), "weight": 0.5}]
    mixed = load_dataset(mix, tok, SEQ, num_proc=2)
    assert_same_blocks(ref, mixed)
    assert mixed.stats.records == {"text": 60, "completion": len(kept)}
    b_twice_and_a_half = [row for line, row in enumerate(b, 1) for _ in range(copies(2.5, 0, line))]
    assert len(b_twice_and_a_half) > 2 * len(b)
    assert_same_blocks(load_dataset([{"path": str(pb), "weight": 2.5}], tok, SEQ),
                       load_dataset(write_jsonl(tmp_path / "ref2.jsonl", b + b + [r for line, r in enumerate(b, 1)
                                                                                  if copies(2.5, 0, line) > 2]),
                                    tok, SEQ))


def test_eval_path_gives_the_held_out_blocks(tiny_checkpoint, tok, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in demo_texts(50, seed=4)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in demo_texts(20, seed=5)])
    cfg = load_config(None, [f"data.path={train_file}", f"data.eval_path={eval_file}", f"train.seq_len={SEQ}"])
    assert cfg.data.eval_fraction == 0  # the default share is not used with an eval path
    train, held_out = load_splits(cfg, tok)
    assert_same_blocks(train, load_dataset(train_file, tok, SEQ))  # all of data.path trains
    assert_same_blocks(held_out, load_dataset(eval_file, tok, SEQ))
    fraction = load_config(None, [f"data.path={train_file}", f"train.seq_len={SEQ}", "data.eval_fraction=0.2"])
    tr, ev = load_splits(fraction, tok)  # the last 20% of the records, packed apart
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    assert_same_blocks(tr, load_dataset(write_jsonl(tmp_path / "first.jsonl", rows[:40]), tok, SEQ))
    assert_same_blocks(ev, load_dataset(write_jsonl(tmp_path / "last.jsonl", rows[40:]), tok, SEQ))
    with pytest.raises(ConfigError, match="data.eval_path and data.eval_fraction=0.2 both choose the held-out data"):
        load_config(None, [f"data.path={train_file}", f"data.eval_path={eval_file}", "data.eval_fraction=0.2"])
    explicit_zero = load_config(None, [f"data.path={train_file}", f"data.eval_path={eval_file}", "data.eval_fraction=0"])
    assert explicit_zero.data.eval_fraction == 0
    # an eval source that data.path trains on too (a mixture's entry, by another spelling): it trained on the
    # held-out records without a word
    leak = load_config(None, [f"data.path=[{train_file},{tmp_path / '.' / 'eval.jsonl'}]",
                              f"data.eval_path={eval_file}", f"train.seq_len={SEQ}"])
    with pytest.raises(DataError, match=f"data.eval_path source {eval_file} is a data.path source too: .* drop it"):
        load_splits(leak, tok)


def documents(ds) -> list[tuple[int, ...]]:
    """Every document (or piece of one) of the blocks, as its token ids."""
    out = []
    for k in range(len(ds)):
        n = int(ds.lengths[k])
        ids, pos = ds.input_ids[k, :n].tolist(), ds.position_ids[k, :n].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [n]
        out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("weights", [(2,), (1.5,), (2, 0.5), (1,)])
def test_held_out_records_are_never_trained_on(tok, tmp_path, weights):
    """data.eval_fraction holds out the last share of each source's records before the weights repeat them, once
    each and in blocks of their own: no held-out document is in a training block, even with weight 2 or 1.5
    (before: the last blocks were held out, later copies of records whose first copies trained), and a long one
    is not split between the two (before: the cut was a block index)."""
    texts = demo_texts(100, seed=6)
    texts[88] = " ".join(texts[:12])  # longer than SEQ, just before the cut; the next one just after it
    texts[90] = " ".join(texts[12:24])
    pa = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{k}: {t}"} for k, t in enumerate(texts)])
    pb = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{k}: ", "completion": t} for k, t in enumerate(texts[:40])])
    paths = [pa, pb][:len(weights)]
    mix = [{"path": str(p), "weight": w} for p, w in zip(paths, weights)]
    train, held_out = load_dataset(mix, tok, SEQ, num_proc=1).split(0.1)
    rows = [[json.loads(line) for line in p.read_text().splitlines()] for p in paths]
    held = [r[len(r) - len(r) // 10:] for r in rows]  # the last 10% of each source
    assert held_out.stats.records == {"text": 10} | ({"completion": 4} if len(paths) > 1 else {})
    assert_same_blocks(held_out, load_dataset(write_jsonl(tmp_path / "held.jsonl", sum(held, [])), tok, SEQ))
    eval_docs, train_docs = set(documents(held_out)), set(documents(train))
    assert eval_docs and not eval_docs & train_docs
    text = {tok.decode(d) for d in train_docs}
    assert not any(f"a{k}:" in t for t in text for k in range(90, 100))
    assert not any(f"b{k}:" in t for t in text for k in range(36, 40))
    kept = [[row for p in range(math.ceil(w)) for line, row in enumerate(r[:len(r) - len(h)], 1)
             if copies(w, si, line) > p] for si, (r, h, w) in enumerate(zip(rows, held, weights))]  # pass by pass
    assert_same_blocks(train, load_dataset(write_jsonl(tmp_path / "kept.jsonl", sum(kept, [])), tok, SEQ))
    assert train.fingerprint() != load_dataset(mix, tok, SEQ).fingerprint()


def test_sources_in_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  path:\n    - {path: a.jsonl, weight: 3}\n    - b.parquet\n  num_proc: 2\n")
    cfg = load_config(cfg_file)
    assert cfg.data.path == [{"path": "a.jsonl", "weight": 3}, "b.parquet"] and cfg.data.num_proc == 2
    assert load_config(None, ["data.path=[{path: x.jsonl, weight: 0.5}]"]).data.path == [{"path": "x.jsonl",
                                                                                           "weight": 0.5}]
    for bad, match in [("data.path=[{path: a.jsonl, weight: -1}]", r"data.path\[0\].weight must be a positive number"),
                       ("data.path=[{path: a.jsonl, wieght: 2}]", r"data.path\[0\] has unknown key 'wieght'"),
                       ("data.path=[]", "data.path must be a path or a non-empty list"),
                       ("data.path=[{weight: 2}]", r"data.path\[0\].path must be a non-empty string"),
                       ("data.cache_dir=[1]", "data.cache_dir must be a string"),
                       ("data.num_proc=-1", "data.num_proc must be >= 0")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


def test_labels_of_arrow_rows_follow_the_record_formats(tok, same_data):
    """A spot check that arrow rows keep their meaning: a prompt/completion row's prompt has no loss."""
    ds = load_dataset(same_data / "d.parquet", tok, 256, packing=False, chat_template="chatml", num_proc=1)
    row = 1  # the second record: prompt/completion
    prompt = records()[1]["prompt"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (ds.labels[row, :n_prompt] == IGNORE).all() and (ds.labels[row, n_prompt:int(ds.lengths[row])] != IGNORE).all()
    assert os.path.isdir(same_data / "saved")


QWEN3_TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"


def tool_records() -> list[dict]:
    """Agent traces as OpenAI-style exports hold them: tool definitions whose parameters differ in type between
    records, assistant messages with ``tool_calls`` and a null content, tool results."""
    rows = []
    for k, text in enumerate(demo_texts(12, seed=5)):
        tool = {"type": "function", "function": {"name": f"find_{k % 3}", "description": text[:20], "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "default": 3 if k % 2 else "three"}}}}}
        call = {"type": "function", "function": {"name": f"find_{k % 3}",
                                                 "arguments": {"n": k, "label": None} if k % 2 else "{}"}}
        rows.append({"tools": [tool], "messages": [
            {"role": "user", "content": text[:25]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": str(k)},
            {"role": "assistant", "content": text}]})
    return rows


def test_tool_calls_read_the_same_from_jsonl_parquet_and_save_to_disk(tmp_path):
    """``datasets`` stores fields whose type varies between rows (messages with and without ``tool_calls``, the
    tools' parameters) as JSON text; they are decoded as ``datasets`` decodes them, so every kind gives the
    blocks of the JSON Lines, the nulls inside a tool call's arguments kept."""
    import datasets

    jsonl = write_jsonl(tmp_path / "t.jsonl", tool_records())
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "hf_build"))
    assert "Json" in repr(ds.features)  # the case at hand
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    tok = qwen3_tokenizer()
    options = {"chat_template": str(QWEN3_TEMPLATE), "num_proc": 1, "packing": False}
    ref = load_dataset(jsonl, tok, 1024, **options)
    text = tok.decode(ref.input_ids[0][: int(ref.lengths[0])])
    assert '"default": "three"' in text and '<tool_call>\n{"name": "find_0", "arguments": {}}' in text
    assert '"arguments": {"n": 1, "label": null}' in tok.decode(ref.input_ids[1][: int(ref.lengths[1])])
    for other in ("t.parquet", "saved"):
        assert_same_blocks(ref, load_dataset(tmp_path / other, tok, 1024, **options))


def test_a_json_file_may_hold_an_array_or_columns(tok, tmp_path):
    """Alpaca's ``alpaca_data.json`` is one JSON array (pretty-printed); ``{"col": [...]}`` objects of columns
    and one-line arrays read the same."""
    rows = [r for r in records() if "instruction" in r or "text" in r]
    ref = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, SEQ)
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "line.json").write_text(json.dumps(rows))
    # named .jsonl, an array reads as HF datasets' json loader reads it (it was refused: "invalid JSON")
    (tmp_path / "pretty.jsonl").write_text("\ufeff\n" + json.dumps(rows, indent=2))
    (tmp_path / "line.jsonl").write_text(json.dumps(rows))
    for name in ("pretty.jsonl", "line.jsonl"):
        assert_same_blocks(ref, load_dataset(tmp_path / name, tok, SEQ))
    alpaca = [r for r in rows if "instruction" in r]
    columns = {k: [r.get(k, "") for r in alpaca] for k in ("instruction", "input", "output")}
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    for name in ("pretty.json", "line.json"):
        assert_same_blocks(ref, load_dataset(tmp_path / name, tok, SEQ))
    # (the alpaca prompt fills a SEQ block: its documents are split here, else left out)
    assert_same_blocks(load_dataset(write_jsonl(tmp_path / "a.jsonl", [{**r, "input": r.get("input", "")}
                                                                      for r in alpaca]), tok, SEQ,
                                    long_documents="split"),
                       load_dataset(tmp_path / "columns.json", tok, SEQ, long_documents="split"))
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n{"text": ')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON .*one JSON array of records"):
        load_dataset(tmp_path / "bad.json", tok, SEQ)
    (tmp_path / "strings.json").write_text(json.dumps(["hello", '{"text": "x"}']))  # elements are never re-read
    with pytest.raises(DataError, match=r"strings.json: record 1: expected a JSON object .*got 'hello'"):
        load_dataset(tmp_path / "strings.json", tok, SEQ)  # its first element, not its line ("strings.json:1")
    (tmp_path / "record.json").write_text(json.dumps({"ids": [1, 2, 3], "text": "One record, not columns."}))
    assert load_dataset(tmp_path / "record.json", tok, SEQ).stats.records == {"text": 1}


def test_a_record_is_named_by_what_it_is_in_its_file(tmp_path):
    """Errors name a record by its line in JSON Lines, and by its place in a JSON array ("record N"), a .txt file
    ("paragraph N") or a table ("row N"): an array's element, a paragraph, read as a line number ("FILE:2")."""
    from lora_dist.sources import record_place

    lines, array, pretty = tmp_path / "l.json", tmp_path / "a.json", tmp_path / "p.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    array.write_text('[{"text": "a"}, {"text": "b"}]')
    pretty.write_text('[\n  {"text": "a"}\n]\n')  # a .jsonl holding one array, as HF datasets' json loader reads it
    assert record_place(lines, "jsonl", 2) == f"{lines}:2"
    assert record_place(array, "jsonl", 2) == f"{array}: record 2" and record_place(pretty, "jsonl", 1).endswith(
        ": record 1")
    assert record_place(tmp_path / "d.txt", "txt", 3) == f"{tmp_path / 'd.txt'}: paragraph 3"
    assert record_place(tmp_path / "d.parquet", "parquet", 0) == f"{tmp_path / 'd.parquet'}: row 0"


def test_null_fields_are_absent_ones_in_json_lines_too(tok, tmp_path):
    """As parquet reads them: a null prompt is no prompt, a null alpaca input no input (before: the text "None");
    a field a record's format does not read (a "tools" string beside a text) is left alone."""
    nulls = [{"prompt": None, "completion": "The red fox."}, {"instruction": "Name it.", "input": None, "output": "x"},
             {"text": "A small robot.", "tools": "[]", "meta": None}]
    absent = [{"completion": "The red fox."}, {"instruction": "Name it.", "output": "x"}, {"text": "A small robot."}]
    assert_same_blocks(load_dataset(write_jsonl(tmp_path / "n.jsonl", nulls), tok, SEQ),
                       load_dataset(write_jsonl(tmp_path / "a.jsonl", absent), tok, SEQ))
