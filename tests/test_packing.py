"""Correct packing (issue 12, part 5): documents whole in their block, positions restarting at 0, attention
never crossing documents; the loss of a packed block equals the token-weighted mean of its documents'
losses computed one by one (a real tiny Llama, fp32). Also the data dump and summary (part 6)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lora_dist.config import load_config
from lora_dist.data import IGNORE, block_causal_mask, dump_blocks, load_dataset, load_tokenizer, model_kwargs, summarize
from lora_dist.sources import DataError
from lora_dist.demo import demo_texts

SEQ = 96


def loss_sum_and_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (labels shifted, -100 ignored), as training computes it."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def write_records(path, n: int = 24):
    """Chat, prompt/completion and text records of varied lengths (some longer than SEQ)."""
    rows = []
    for k, text in enumerate(demo_texts(n, seed=5)):
        if k % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": text[:20]}, {"role": "assistant", "content": text}]})
        elif k % 3 == 1:
            rows.append({"prompt": text[:15], "completion": text[15:]})
        else:
            rows.append({"text": text * (3 if k % 7 == 0 else 1)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def token_cache_dir(tmp_path, monkeypatch):
    """Each test's token cache in its own temp dir, never the user's."""
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "token_cache"))


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("llama")
    tok = load_tokenizer(path)
    data = write_records(tmp_path_factory.mktemp("packing") / "d.jsonl")
    return path, tok, data


def documents(batch: dict, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (ids, labels) of each document of a row (the padding is one too, without labels)."""
    starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [(batch["input_ids"][row, a:b], batch["labels"][row, a:b]) for a, b in zip(starts, starts[1:])]


def one_by_one(model, batch: dict) -> float:
    """The token-weighted mean loss of every document of the batch, each computed alone."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row in range(batch["input_ids"].shape[0]):
        for ids, labels in documents(batch, row):
            loss, n = loss_sum_and_count(model(input_ids=ids[None]).logits, labels[None])
            total, count = total + loss.double(), count + n
    return float(total / count)


def packed(model, batch: dict) -> float:
    loss, n = loss_sum_and_count(model(**model_kwargs(batch, model.config)).logits, batch["labels"])
    return float(loss) / n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_block_loss_is_the_token_weighted_mean_of_its_documents(setup, attn, packing):
    import transformers

    path, tok, data = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    ds = load_dataset(data, tok, SEQ, packing=packing, chat_template="chatml")
    rows = [k for k in range(len(ds)) if int((ds.position_ids[k, 1:] == 0).sum()) >= (2 if packing else 1)]
    assert len(rows) >= 3  # rows of two documents or more (packed), of a document and padding (padded)
    batch = ds.inputs(rows[:3])
    assert batch["attention_mask"].shape == (3, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with torch.no_grad():
        ref = one_by_one(model, batch)
        assert "attention_mask" in model_kwargs(batch, model.config)
        assert packed(model, batch) == pytest.approx(ref, abs=1e-5)
        if packing:  # the test can tell: without the mask, documents attend to each other
            plain, n = loss_sum_and_count(model(input_ids=batch["input_ids"]).logits, batch["labels"])
            assert abs(float(plain) / n - ref) > 1e-4


def test_varlen_kwargs_flatten_the_batch_and_keep_the_loss(setup):
    """flash/flex get one flattened row and position_ids only; transformers' own packed-sequence path (here
    sdpa's, which reads the same position_ids) gives the same loss with the unflattened labels."""
    import transformers

    path, tok, data = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ds = load_dataset(data, tok, SEQ, chat_template="chatml")
    batch = ds.inputs([0, 1, 2])
    model.config._attn_implementation = "flash_attention_2"  # only for model_kwargs: the forward below runs sdpa
    kwargs = model_kwargs(batch, model.config)
    model.config._attn_implementation = "sdpa"
    assert set(kwargs) == {"input_ids", "position_ids", "use_cache"} and kwargs["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss, n = loss_sum_and_count(model(**kwargs).logits, batch["labels"])
        assert float(loss) / n == pytest.approx(one_by_one(model, batch), abs=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_keep_their_windows(setup, arch):
    """Sliding-window layers (all of Mistral's, every other one of Gemma-2's) get no 4-D mask, which would
    replace their windows: transformers builds each layer's mask from the position_ids."""
    import transformers as tf

    _, tok, data = setup
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=8, max_position_embeddings=256)
    config = (tf.MistralConfig(**common) if arch == "mistral"
              else tf.Gemma2Config(**common, head_dim=8, layer_types=["sliding_attention", "full_attention"]))
    torch.manual_seed(0)
    attn = "sdpa" if arch == "mistral" else "eager"  # Gemma-2 is eager only
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
    ds = load_dataset(data, tok, SEQ, chat_template="chatml")
    rows = [k for k in range(len(ds)) if int((ds.position_ids[k, 1:] == 0).sum()) >= 2][:3]
    batch = ds.inputs(rows)
    assert "attention_mask" not in model_kwargs(batch, model.config)
    with torch.no_grad():
        ref = one_by_one(model, batch)
        assert packed(model, batch) == pytest.approx(ref, abs=1e-5)
        mask = batch["attention_mask"]
        if attn == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo().min)
        masked, n = loss_sum_and_count(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                             attention_mask=mask, use_cache=False).logits, batch["labels"])
        assert abs(float(masked) / n - ref) > 1e-4  # the 4-D mask would have dropped the windows


def test_documents_stay_whole_and_long_ones_are_split_into_consecutive_blocks(setup, tmp_path, caplog):
    _, tok, _ = setup
    texts = demo_texts(30, seed=9)
    long = " ".join(texts[:12])
    rows = [{"text": t} for t in texts[12:20]] + [{"text": long}] + [{"text": t} for t in texts[20:]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="lora_dist.data"):
        ds = load_dataset(path, tok, SEQ)
    assert ("documents longer than train.seq_len=96: 1 split into consecutive blocks, 0 cut to their first 96 tokens, "
            "0 left out, of 19 (data.long_documents=auto)") in caplog.text
    eos = tok.eos_token_id
    docs = [tok(r["text"], add_special_tokens=False)["input_ids"] + [eos] for r in rows]
    assert len(docs[8]) > 2 * SEQ and ds.stats.split == 1 and ds.stats.documents == 19
    # Every token is kept, in order, and the last partial block is padded, not dropped.
    kept = torch.cat([ds.input_ids[k, : int(ds.lengths[k])] for k in range(len(ds))]).tolist()
    assert kept == [t for d in docs for t in d] and ds.stats.tokens == len(kept)
    assert int(ds.lengths[-1]) < SEQ and (ds.input_ids[-1, int(ds.lengths[-1]):] == tok.pad_token_id).all()
    # Each short document lies in one block, starting at position 0.
    segments = []
    for k in range(len(ds)):
        pos = ds.position_ids[k, : int(ds.lengths[k])].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        segments += [ds.input_ids[k, a:b].tolist() for a, b in zip(starts, starts[1:])]
        assert pos == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
    pieces = [docs[8][i : i + SEQ] for i in range(0, len(docs[8]), SEQ)]
    assert segments == docs[:8] + pieces + docs[9:]
    first = next(k for k in range(len(ds)) if ds.input_ids[k].tolist()[: SEQ] == pieces[0])
    assert [ds.input_ids[first + j, : len(p)].tolist() for j, p in enumerate(pieces)] == pieces  # consecutive


def pieces(ds) -> list[tuple[list[int], list[int]]]:
    """Each document or piece of the blocks (positions restart at each): its ids and labels."""
    out = []
    for k in range(len(ds)):
        n = int(ds.lengths[k])
        pos = ds.position_ids[k, :n].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [n]
        out += [(ds.input_ids[k, a:b].tolist(), ds.labels[k, a:b].tolist()) for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("how", ["auto", "truncate", "drop"])
def test_a_long_document_with_a_prompt_is_truncated_not_learned_without_it(setup, tmp_path, how):
    """data.long_documents: split, a long completion's later pieces are learned with neither its prompt nor the
    completion's start in view; auto cuts it to its first seq_len tokens (as TRL truncates) and splits long text,
    which reads on; truncate cuts both, drop leaves both out. A prompt that fills the block leaves nothing to
    learn: left out."""
    _, tok, _ = setup
    texts = demo_texts(30, seed=9)
    long = " ".join(texts[:12])
    rows = [{"text": long}, {"prompt": texts[12], "completion": long}, {"text": texts[13]},
            {"prompt": long, "completion": texts[14]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = load_dataset(path, tok, SEQ, long_documents="split")
    assert (split.stats.split, split.stats.truncated, split.stats.dropped) == (3, 0, 0)
    theirs = pieces(split)  # the text's pieces, the completion's (its first holds the prompt), the short text...
    first_completion = next(k for k, (_, labels) in enumerate(theirs) if IGNORE in labels[1:])
    assert IGNORE not in theirs[first_completion + 1][1][1:]  # ... whose next piece is learned without it
    got = load_dataset(path, tok, SEQ, long_documents=how)
    assert (got.stats.split, got.stats.truncated, got.stats.dropped) == {
        "auto": (1, 1, 1), "truncate": (0, 2, 1), "drop": (0, 0, 3)}[how]
    ours = pieces(got)
    cut = {"auto": theirs[:first_completion + 1], "truncate": [theirs[0], theirs[first_completion]], "drop": []}[how]
    assert ours[:-1] == cut and len(theirs[0][0]) == len(theirs[first_completion][0]) == SEQ
    short = ours[-1]  # the short text, whole; the prompt that fills a block is left out
    assert short in theirs and len(short[0]) < SEQ and IGNORE not in short[1][1:]
    only = tmp_path / "only.jsonl"  # nothing left at all: one line saying why, and what to change
    only.write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(DataError, match=r"nothing to train on: its 1 documents are all longer than "
                                        r"train.seq_len=96 and were left out .*set data.long_documents=split"):
        load_dataset(only, tok, SEQ, long_documents=how)


@pytest.mark.parametrize("bos", [False, True], ids=["texts-start-with-no-bos", "texts-start-with-bos"])
def test_a_one_token_prompt_is_a_prompt(setup, tmp_path, bos):
    """A completion whose prompt is one token is truncated as every document with a prompt, not split as text:
    without a BOS (Qwen, GPT-2) that prompt is the only token without a label, where a text's first token has one;
    with it (Llama), a text's only unlabeled token is its BOS."""
    from tokenizers.processors import TemplateProcessing

    _, tok, _ = setup
    if bos:
        tok = load_tokenizer(setup[0])
        tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[
            (tok.bos_token, tok.bos_token_id)])
    long = " ".join(demo_texts(12, seed=9))
    prompt = next(w for w in long.split() if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": " " + long}) + "\n" + json.dumps({"text": long}) + "\n")
    ds = load_dataset(path, tok, SEQ, num_proc=1)
    assert (ds.stats.split, ds.stats.truncated) == (1, 1)
    completion, *text = pieces(ds)
    assert len(completion[0]) == SEQ and completion[1][:1 + bos] == [IGNORE] * (1 + bos)
    assert completion[0][bos] == tok(prompt, add_special_tokens=False)["input_ids"][0]
    assert len(text) > 2 and all(IGNORE not in labels[1:] for _, labels in text)


def test_padded_per_sequence_batches(setup):
    _, tok, data = setup
    ds = load_dataset(data, tok, SEQ, packing=False, chat_template="chatml")
    assert all(int((ds.position_ids[k, : int(ds.lengths[k])] == 0).sum()) == 1 for k in range(len(ds)))
    batch = ds.inputs([0, 1])
    assert batch["input_ids"].shape[1] == int(ds.lengths[:2].max())  # columns of padding only are dropped
    full = [k for k in range(len(ds)) if int(ds.lengths[k]) == SEQ]
    assert full and ds.inputs(full[:2])["attention_mask"] is None  # nothing to mask: plain causal attention


def test_the_training_api_of_before_still_works(setup):
    _, tok, data = setup
    ds = load_dataset(data, tok, SEQ, chat_template="chatml")
    ids, labels = ds.batch(5, 4, seed=1)
    assert ids.shape == labels.shape == (4, SEQ)
    batch = ds.micro_batch(5, 4, seed=1)
    width = batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"], ids[:, :width]) and torch.equal(batch["labels"], labels[:, :width])
    assert (labels[:, width:] == IGNORE).all()
    train, held_out = ds.split(0.2)  # the last 20% of the records (4 of 24), packed apart
    assert sum(held_out.stats.records.values()) == 4 and sum(train.stats.records.values()) == 20
    again, same_held_out = train.split(0.2)  # loaded with that fraction: the same blocks
    assert again is train and same_held_out is held_out and len(train) < len(ds)


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(pos)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert block_causal_mask(torch.arange(5)[None]) is None
    batch = {"input_ids": pos, "position_ids": pos, "attention_mask": block_causal_mask(pos)}
    additive = model_kwargs(batch, SimpleNamespace(_attn_implementation="eager"))
    assert additive["attention_mask"][0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_dump_and_summary(setup, tmp_path):
    path, tok, data = setup
    cfg = load_config(None, [f"model.path={path}", f"data.path={data}", f"train.seq_len={SEQ}",
                             "data.chat_template=chatml", "data.eval_fraction=0.1"])
    out = tmp_path / "blocks.jsonl"
    n = dump_blocks(cfg, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ds = load_dataset(data, tok, SEQ, chat_template="chatml", eval_fraction=0.1)  # the training blocks, then the
    assert n == len(lines) == len(ds) + len(ds.held_out)  # held-out ones
    for key in ("input_ids", "labels", "position_ids"):
        assert [line[key] for line in lines] == getattr(ds, key).tolist() + getattr(ds.held_out, key).tolist()
    assert dump_blocks(cfg, tmp_path / "two.jsonl", limit=2) == 2
    assert dump_blocks(cfg, out, limit=2) == 2  # an earlier dump is replaced, whole
    assert len(out.read_text().splitlines()) == 2
    for mine in ('{"text": "mine"}\n', '{"input_ids": [1, 2], "attention_mask": [1, 1]}\n'):  # a user's own
        notes = tmp_path / "notes.jsonl"
        notes.write_text(mine)
        with pytest.raises(DataError, match="is not a block dump lora-dist data wrote; choose another --dump path"):
            dump_blocks(cfg, notes)
        assert notes.read_text() == mine
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temporary file left
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    assert dump_blocks(cfg, link, limit=1) == 1  # through a link: its target, an earlier dump, is replaced
    assert link.is_symlink() and len(out.read_text().splitlines()) == 1
    assert dump_blocks(cfg, "/dev/null", limit=2) == 2  # a device is written as a stream, never replaced
    assert Path("/dev/null").is_char_device()
    text = summarize(cfg)
    s, h = ds.stats, ds.held_out.stats
    assert "records: 24 (8 completion, 8 messages, 8 text)" in text
    assert f"blocks: {s.blocks + h.blocks} of train.seq_len={SEQ} ({s.blocks} train, {h.blocks} eval)" in text
    assert f"tokens with a loss: {s.loss_tokens + h.loss_tokens}" in text
    assert (f"documents longer than train.seq_len: {s.split + h.split} split, {s.truncated + h.truncated} truncated, "
            f"{s.dropped + h.dropped} left out, of 24") in text and s.split >= 1 and s.truncated >= 1
    assert "[[<|im_start|>user\n" in text  # the first block's masked text is marked
