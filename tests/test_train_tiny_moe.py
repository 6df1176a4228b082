"""CPU smoke test of benchmarks/train_tiny_moe.py: a few steps of a tiny model, both routings."""

from __future__ import annotations

import pytest
import torch
from script_modules import load_script


@pytest.fixture(scope="module")
def tiny():
    return load_script("benchmarks/train_tiny_moe.py", "train_tiny_moe")


def test_stdlib_data_is_split_by_file_and_needs_no_download(tiny):
    train, val, info = tiny.stdlib_bytes(1 << 16, 0.1)
    assert train.dtype == torch.uint8 and train.numel() == 1 << 16 and val.numel() > 0
    assert info["train_files"] + info["val_files"] == info["files_total"] and info["val_files"] >= 1


@pytest.mark.parametrize("routing", ["topk", "token_rounding"])
def test_a_few_steps_lower_the_validation_loss(tiny, routing):
    cfg = tiny.replace(tiny.smoke_config(), steps=6, eval_every=6)
    train, val, _ = tiny.stdlib_bytes(1 << 16, 0.1)
    run = tiny.train(cfg, routing, 0, train, val, "reference", torch.device("cpu"), torch.float32)
    (step0, loss0), (step_n, loss_n) = run["val_loss"][0], run["val_loss"][-1]
    assert (step0, step_n) == (0, 6)
    assert loss0 == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.5)  # untrained: ~uniform bytes
    assert loss_n < loss0 - 0.05, f"{routing}: validation loss {loss0:.3f} -> {loss_n:.3f} did not decrease"
    assert run["tokens_per_expert_per_tile"] == 4.0


def test_summary_groups_seeds(tiny):
    runs = [{"routing": r, "tokens_per_expert_per_tile": 4.0, "final_val_loss": v}
            for r, v in (("topk", 2.0), ("topk", 2.2), ("token_rounding", 2.1))]
    got = {s["routing"]: s for s in tiny.summarize(runs)}
    assert got["topk"]["seeds"] == 2 and got["topk"]["final_val_loss_mean"] == pytest.approx(2.1)
    assert (got["topk"]["final_val_loss_min"], got["topk"]["final_val_loss_max"]) == (2.0, 2.2)
