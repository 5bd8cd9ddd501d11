"""Every node reads the same base: node-local copies of ``model.path`` that differ are refused on every rank."""

from __future__ import annotations

import json
import shutil

import pytest

from distutil import REPO, ranks

SCRIPT = str(REPO / "tests" / "dist_scripts" / "same_base.py")


def _outcomes(*paths) -> list:
    return json.loads(ranks(2, SCRIPT, *map(str, paths)).stdout.strip().splitlines()[-1])


@pytest.mark.dist
def test_nodes_with_the_same_base_pass_and_with_another_revision_are_refused(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    copy = shutil.copytree(base, tmp_path / "copy")  # another node's copy of the same checkpoint
    assert _outcomes(base, copy) == [None, None]

    other = tiny_checkpoint("llama", hidden=64, layers=2, seed=7)  # same config and shapes, other weights
    errors = _outcomes(base, other)
    assert None not in errors and "\n" not in errors[0]
    assert errors[0].split(" holds ")[1] == errors[1].split(" holds ")[1]  # (each names its own model.path here)
    assert "holds different checkpoints on different nodes (node 0" in errors[0] and "; node 1" in errors[0]
    assert "give every node the same copy" in errors[0]


@pytest.mark.dist
def test_a_copy_one_node_cannot_open_fails_every_rank_naming_it(tiny_checkpoint, tmp_path):
    """Not only the rank that found it: the others would wait on the next collective until the timeout."""
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    cut = shutil.copytree(base, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    errors = _outcomes(base, cut)
    assert "is not a readable safetensors file" in errors[1] and "\n" not in errors[1]
    assert errors[0].startswith("rank 1 failed: ") and "is not a readable safetensors file" in errors[0]
