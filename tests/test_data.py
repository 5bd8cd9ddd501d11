"""Data loading, packing, completion-only labels and the global batch split."""

from __future__ import annotations

import json

import pytest
import torch

from lora_dist.data import IGNORE, DataError, PackedDataset, load_dataset
from lora_dist.demo import make_tokenizer, write_demo_data
from lora_dist.launch import LaunchEnv
from lora_dist.train import Batches


@pytest.fixture(autouse=True)
def token_cache_dir(tmp_path, monkeypatch):
    """Each test's token cache in its own temp dir, never the user's."""
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "token_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_text_records_are_packed_whole_with_eos(tokenizer, tmp_path):
    """Each document (its tokens + EOS) lies whole in one block, in record order; a block that cannot take
    the next document is padded. Labels are the inputs except each document's first token (nothing before
    it in the document predicts it). Before issue 12 the token stream was cut every 16 tokens, across
    documents, and the tail dropped; labels equalled the inputs everywhere."""
    texts = ["hello world", "the red fox"] * 20
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    ds = load_dataset(path, tokenizer, seq_len=16)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    rows, row = [], []
    for doc in docs:
        if len(row) + len(doc) > 16:
            rows.append(row)
            row = []
        row += doc
    rows.append(row)
    pad = tokenizer.pad_token_id
    assert ds.input_ids.tolist() == [r + [pad] * (16 - len(r)) for r in rows]
    assert ds.lengths.tolist() == [len(r) for r in rows]
    starts = ds.position_ids == 0
    assert torch.equal(ds.labels[~starts & (ds.input_ids != pad)], ds.input_ids[~starts & (ds.input_ids != pad)])
    assert (ds.labels[starts] == IGNORE).all() and ds.stats.split == 0 and ds.stats.documents == len(texts)


def test_prompt_completion_masks_the_prompt(tokenizer, tmp_path):
    path = write_demo_data(tmp_path / "pc.jsonl", n=50, kind="prompt_completion")
    ds = load_dataset(path, tokenizer, seq_len=32)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    first = rows[0]
    n_prompt = len(tokenizer(first["prompt"], add_special_tokens=False)["input_ids"])
    n_completion = len(tokenizer(first["completion"], add_special_tokens=False)["input_ids"])
    labels = ds.labels.flatten().tolist()
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt : n_prompt + n_completion] == ds.input_ids.flatten().tolist()[n_prompt : n_prompt + n_completion]
    assert IGNORE not in labels[n_prompt : n_prompt + n_completion + 1]


def test_txt_file(tokenizer, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first paragraph of text.\n\nsecond one here.\n\n" * 30)
    assert len(load_dataset(path, tokenizer, seq_len=16)) > 0


def test_txt_paragraphs_are_the_text_between_blank_lines(tokenizer, tmp_path):
    """A line of spaces or tabs is blank too, several blank lines are one break, and no paragraph learns the line
    breaks around it (the file's last one included) or the spaces ending it; a first line's indent stays."""
    path = tmp_path / "d.txt"
    path.write_text("para one\nline two\n\npara two\n \t \npara three\n\n\n\n  para four  \n \n")
    ds = load_dataset(path, tokenizer, seq_len=64, packing=False, eval_fraction=0)
    eos = tokenizer.eos_token
    got = [tokenizer.decode(ds.input_ids[k, : int(ds.lengths[k])]) for k in range(len(ds))]
    assert got == [f"{p}{eos}" for p in ("para one\nline two", "para two", "para three", "  para four")]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_single_process_batch(tokenizer, tmp_path, world):
    ds = load_dataset(write_demo_data(tmp_path / "d.jsonl", n=80), tokenizer, seq_len=16)
    single = Batches(ds, world * 2, LaunchEnv("single", 0, 0, 1, 1, 0, 1, "x", 0), seed=3, device="cpu")
    for k in range(7):  # crosses an epoch boundary of the shuffled stream
        ref = single.get(k)
        for r in range(world):
            part = Batches(ds, 2, LaunchEnv("torchrun", r, r, world, world, 0, 1, "x", 0), 3, "cpu").get(k)
            width = part["input_ids"].shape[1]  # a micro-batch drops columns that are padding in all its rows
            rows = slice(2 * r, 2 * r + 2)
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(part[key], ref[key][rows, :width]), key
            assert (ref["labels"][rows, width:] == IGNORE).all()


def test_epochs_are_reshuffled(tokenizer, tmp_path):
    ds = load_dataset(write_demo_data(tmp_path / "d.jsonl", n=40), tokenizer, seq_len=16)
    n = len(ds)
    a, _ = ds.batch(0, n, seed=0)
    b, _ = ds.batch(n, n, seed=0)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))  # each epoch is a permutation
    assert not torch.equal(a, b)


def test_a_stream_draws_each_epochs_order_once(tokenizer, tmp_path, monkeypatch):
    """Every micro-batch drew its epoch's permutation again: 65 ms each at 4M blocks, before every forward."""
    ds = load_dataset(write_demo_data(tmp_path / "d.jsonl", n=40), tokenizer, seq_len=16)
    n = len(ds)
    expected = [int(i) for e in range(3)
                for i in torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + e))]
    drawn = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: drawn.append(a[0]) or real(*a, **k))
    got = [int(i) for start in range(0, 3 * n - 3, 3) for i in ds.indices(start, 3, seed=7)]
    assert got == expected[:len(got)] and len(drawn) == 3  # the same stream, one draw per epoch


def test_the_fingerprint_changes_with_any_block_and_only_then(tokenizer, tmp_path):
    """What a checkpoint records of its data (docs/checkpoint.md): equal for the same blocks, however they are
    held (the cache's int32 memory maps, an int64 copy, a rebuilt cache entry); another for any changed token,
    label, position or length, and for another split of the same file."""
    path = write_demo_data(tmp_path / "d.jsonl", n=60)
    ds = load_dataset(path, tokenizer, seq_len=32)
    again = load_dataset(path, tokenizer, seq_len=32, cache_dir=tmp_path / "rebuilt")
    wide = PackedDataset(ds.input_ids.long(), ds.labels.long(), ds.position_ids.long(), ds.lengths.long())
    assert len(ds.fingerprint()) == 64 and ds.fingerprint() == again.fingerprint() == wide.fingerprint()
    for name in ("input_ids", "labels", "position_ids", "lengths"):
        arrays = {k: getattr(wide, k).clone() for k in ("input_ids", "labels", "position_ids", "lengths")}
        arrays[name].view(-1)[-1] += 1
        assert PackedDataset(**arrays).fingerprint() != ds.fingerprint(), name
    assert PackedDataset(wide.input_ids, wide.labels, None, wide.lengths).fingerprint() != ds.fingerprint()
    train, held_out = ds.split(0.1)
    assert len({train.fingerprint(), held_out.fingerprint(), ds.fingerprint()}) == 3
    assert load_dataset(path, tokenizer, seq_len=48).fingerprint() != ds.fingerprint()


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no records"), ('{"x": 1}\n', 'expected a "text" field'), ("{bad json\n", "invalid JSON")],
)
def test_bad_files(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(path, tokenizer, seq_len=16)


def test_too_little_data_and_too_long_sequences(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "tiny"}) + "\n")
    tiny = load_dataset(path, tokenizer, seq_len=64)  # before issue 12: "less than one block", now one padded block
    assert len(tiny) == 1 and int(tiny.lengths[0]) == len(tokenizer("tiny")["input_ids"]) + 1
    with pytest.raises(DataError, match="exceeds the model's 128 positions"):
        load_dataset(path, tokenizer, seq_len=256, max_positions=128)
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(tmp_path / "d.csv", tokenizer, seq_len=16) if (tmp_path / "d.csv").write_text("a") else None


# Files that gave tracebacks (issue 15, item 10): one line naming the line and the fix.


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
         r"d.jsonl: not UTF-8 text \(byte 0xe9 at line 2, column 14\); convert the file to UTF-8"),
        ("d.txt", b"first.\n\nsecond \xff\xfe paragraph\n", r"d.txt: not UTF-8 text \(byte 0xff at line 3, column 8\)"),
        ("d.jsonl", b"[" * 100_000 + b"\n", r"d.jsonl:1: JSON nested too deeply"),
        ("d.json", b"[" * 100_000 + b"\n", r"d.json:1: JSON nested too deeply"),  # was a RecursionError traceback
    ],
    ids=["latin1-jsonl", "binary-txt", "deep-json", "deep-json-file"],
)
def test_undecodable_files_are_one_line(tokenizer, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_dataset(path, tokenizer, seq_len=16)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("record, field", [
    ('{"text": "broken \\ud800 emoji"}', "field text holds a lone UTF-16 surrogate at character 7"),
    ('{"prompt": "q \\ud83d", "completion": "a"}', "field prompt holds a lone UTF-16 surrogate at character 2"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo \\udc80"}]}',
     r"field messages\[1\]\.content holds a lone UTF-16 surrogate at character 3"),
], ids=["text", "prompt_completion", "messages"])
def test_a_lone_surrogate_is_one_line_naming_the_record_and_field(tokenizer, tmp_path, record, field, num_proc):
    """JSON's "\\ud800" (scraped dumps, a broken emoji) decodes to a lone surrogate, which the Rust tokenizer
    refuses with a bare TypeError (before: a traceback naming no file), in the process and in a worker."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + record + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: {field} .*; replace or drop the character") as err:
        load_dataset(path, tokenizer, seq_len=32, chat_template="chatml", num_proc=num_proc)
    assert "\n" not in str(err.value)


def test_any_tokenizer_error_names_the_record(tokenizer, tmp_path, monkeypatch):
    import lora_dist.token_cache as token_cache

    real = token_cache.tokenize_record

    def fails(record, tok, *args):
        if "boom" in str(record):
            raise RuntimeError("the tokenizer broke\non two lines")
        return real(record, tok, *args)
    monkeypatch.setattr(token_cache, "tokenize_record", fails)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "boom"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: the tokenizer fails on this record \(RuntimeError: the tokenizer "
                                        r"broke on two lines\); fix or drop the record") as err:
        load_dataset(path, tokenizer, seq_len=32, num_proc=1)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_bom_and_crlf_files_read_as_before(tokenizer, tmp_path):
    rows = [json.dumps({"text": "hello world"})] * 40
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text("\n".join(rows))
    bom.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    assert torch.equal(load_dataset(bom, tokenizer, 16).input_ids, load_dataset(plain, tokenizer, 16).input_ids)
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_text("first paragraph.\n\nsecond one.\n\n" * 30)
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    assert torch.equal(load_dataset(crlf, tokenizer, 16).input_ids, load_dataset(lf, tokenizer, 16).input_ids)


def test_data_command_summarizes_and_dumps_what_the_model_sees(tiny_checkpoint, tmp_path, capfd):
    from lora_dist.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                            for i in range(12)))
    common = [f"model.path={tiny_checkpoint('llama')}", f"data.path={data}", "data.chat_template=chatml",
              "train.seq_len=256", "data.eval_fraction=0"]
    assert main(["data", *common]) == 0
    summary = capfd.readouterr().out
    assert "records: 12 (12 messages)" in summary and "tokens with a loss" in summary and "[[" in summary
    out = tmp_path / "blocks.jsonl"
    assert main(["data", *common, "--dump", str(out), "--limit", "3"]) == 0  # options after overrides
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 256
        assert any(label != IGNORE for label in row["labels"]) and any(label == IGNORE for label in row["labels"])
        assert row["position_ids"][0] == 0
    capfd.readouterr()
    assert main(["data", *common, "--dump", "/dev/stdout", "--limit", "2"]) == 0  # `| head`, `> file`, `>> log`
    captured = capfd.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == rows[:2]
    assert "wrote 2 blocks to /dev/stdout" in captured.err


def reference_blocks(path, tokenizer, seq_len: int, packing: bool, template: str):
    """The packing code before the token cache (issue 12 parts 3-4), kept as the reference: every record
    tokenized into Python lists, then laid out in order."""
    from lora_dist.chat import parse_record, resolve_template, tokenize_record

    template = resolve_template(tokenizer, template)
    docs = [tokenize_record(parse_record(json.loads(line)), tokenizer, template)
            for line in path.read_text().splitlines() if line.strip()]
    pad = tokenizer.pad_token_id
    ids, labels, positions, lengths, row, used = [], [], [], [], [], 0

    def flush():
        nonlocal used
        if row:
            for d_ids, d_labels in row:
                ids.extend(d_ids)
                labels.extend([IGNORE] + d_labels[1:])
                positions.extend(range(len(d_ids)))
            ids.extend([pad] * (seq_len - used))
            labels.extend([IGNORE] * (seq_len - used))
            positions.extend(range(seq_len - used))
            lengths.append(used)
            row.clear()
            used = 0

    for d_ids, d_labels in docs:
        pieces = [(d_ids[k:k + seq_len], d_labels[k:k + seq_len]) for k in range(0, len(d_ids), seq_len)]
        if len(pieces) > 1:
            flush()
        for piece in pieces:
            if used + len(piece[0]) > seq_len or (row and not packing):
                flush()
            row.append(piece)
            used += len(piece[0])
    flush()
    return [torch.tensor(a).view(-1, seq_len) for a in (ids, labels, positions)] + [torch.tensor(lengths)]


@pytest.mark.parametrize("seq_len", [16, 96])
@pytest.mark.parametrize("packing", [True, False])
def test_streamed_cached_blocks_equal_the_in_memory_packing(tokenizer, tmp_path, seq_len, packing):
    """The blocks built in worker processes and streamed into the cache are those of the in-memory code they
    replace, on every record format, documents longer than a block included."""
    from lora_dist.demo import demo_texts

    rows = []
    for k, text in enumerate(demo_texts(120, seed=11)):
        rows.append([{"messages": [{"role": "user", "content": text[:20]}, {"role": "assistant", "content": text}]},
                     {"prompt": text[:15], "completion": text[15:]}, {"instruction": text[:9], "output": text},
                     {"text": text * (1 + k % 4)}][k % 4])
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the reference splits every long document (data.long_documents=split; auto truncates those with a prompt)
    ds = load_dataset(path, tokenizer, seq_len, packing=packing, chat_template="chatml", num_proc=2,
                      long_documents="split")
    ref = reference_blocks(path, tokenizer, seq_len, packing, "chatml")
    if seq_len == 16:
        assert ds.stats.split > 0  # documents longer than a block, split
    for got, want in zip((ds.input_ids, ds.labels, ds.position_ids, ds.lengths), ref):
        assert torch.equal(got.long(), want.long())


def _alibi_checkpoint(path, model_type: str):
    """A tiny Bloom, or Falcon with ALiBi, saved with the demo tokenizer."""
    import transformers

    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = (transformers.BloomConfig(n_layer=2, n_head=4, **common) if model_type == "bloom" else
              transformers.FalconConfig(alibi=True, new_decoder_architecture=False, multi_query=True, **common))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch, packed, reason", [
    ("qwen3_next", False, "linear_attention"), ("bloom", False, "ALiBi"), ("falcon_alibi", False, "ALiBi"),
    ("qwen3", True, None)])
def test_models_that_cannot_pack_documents_get_one_document_a_row(tiny_checkpoint, tmp_path, caplog, arch, packed,
                                                                 reason):
    """Qwen3-Next's linear attention (like Mamba and short convolutions in Granite 4, Nemotron-H, Jamba, LFM2)
    carries a state along the sequence that no attention mask stops at a document's end, and ALiBi models (Bloom)
    take no block mask: packing is turned off for them, with a warning, and each row's logits are its document's
    alone (before: Qwen3-Next leaked state between documents, Bloom crashed). Attention-only models stay packed."""
    import transformers

    from lora_dist.config import load_config
    from lora_dist.data import load_data, model_kwargs, summarize

    if arch in ("bloom", "falcon_alibi"):
        base = _alibi_checkpoint(tmp_path / arch, arch.split("_")[0])
    else:
        base = tiny_checkpoint(arch)
    data = write_demo_data(tmp_path / "d.jsonl", n=40)
    cfg = load_config(None, [f"model.path={base}", f"data.path={data}", "train.seq_len=64", "data.num_proc=1",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    assert cfg.data.packing
    with caplog.at_level("WARNING", logger="lora_dist.data"):
        blocks = load_data(cfg, make_tokenizer())
    starts = [(blocks.position_ids[k][: int(blocks.lengths[k])] == 0).sum().item() for k in range(len(blocks))]
    assert (max(starts) > 1) == packed
    assert ("data.packing is off" in caplog.text) == (not packed)
    packing = next(line for line in summarize(cfg).splitlines() if line.startswith("blocks: "))  # lora-dist data
    if packed:
        assert packing.endswith("packing on")
        cfg.data.packing = False
        assert "packing off (data.packing=false)" in summarize(cfg)
        return
    assert reason in caplog.text and "packing off (the model" in packing and reason in packing, packing
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    by_length = sorted(range(len(blocks)), key=lambda k: int(blocks.lengths[k]))
    rows = [by_length[0], by_length[len(by_length) // 2], by_length[-1]]
    assert blocks.lengths[rows[0]] < blocks.lengths[rows[-1]]  # the shorter rows padded
    batch = blocks.inputs(rows)
    with torch.no_grad():
        logits = model(**model_kwargs(batch, model.config)).logits
        for k, row in enumerate(rows):
            n = int(blocks.lengths[row])
            alone = model(input_ids=batch["input_ids"][k:k + 1, :n], use_cache=False).logits[0]
            torch.testing.assert_close(logits[k, :n], alone, atol=2e-5, rtol=0)
