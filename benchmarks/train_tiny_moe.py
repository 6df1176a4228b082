"""Does token rounding hurt quality? A small decoder-only MoE language model, trained twice.

The same model, data and seeds are trained with token-choice top-k routing and with token
rounding (``mode="nearest"``), and the validation loss is compared. As in the paper (Section 6.3,
"TR evaluated with TC top-K"), every model is *evaluated* with plain top-k routing: token rounding
is a training-time routing.

* **Data**: the bytes of CPython's own standard-library ``.py`` files (every machine with Python
  has them; no download). Byte-level, vocabulary 256. The files are sorted by path and split by
  file: the last ``--val-files-frac`` of them are held out for validation.
* **Model**: ``--layers`` pre-norm blocks of causal self-attention (``scaled_dot_product_attention``)
  and a ``sonic_learn.MoE`` feed-forward (``backend="fast"`` on a Hopper GPU, so the CuTe-DSL
  kernels train it; ``"reference"`` elsewhere), RMSNorm, tied byte embeddings.
* **Runs**: for each seed, top-k and token rounding at the batch of ``--tokens`` tokens, where the
  average tokens per expert / tile, T*K / (E*tile_m), is above the paper's condition (>= 2); and
  one seed of both at ``--low-tokens`` tokens per step, below it (T counts the tokens of one
  layer call: batch x sequence).

Output: ``benchmarks/results/train_tiny_moe_<device>.json`` (validation-loss curves and the final
losses per run, the config and the environment), and with ``--plot`` the docs figure
``docs/assets/figures/train_tiny_moe.png`` drawn from a JSON file.

    python benchmarks/train_tiny_moe.py                      # the GPU run (bf16, fast backend)
    python benchmarks/train_tiny_moe.py --smoke              # a few CPU steps (what CI runs)
    python benchmarks/train_tiny_moe.py --plot results.json  # only the figure
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sonic_learn import MoE

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Data: CPython's standard library as bytes
# ----------------------------------------------------------------------------------------------
def stdlib_bytes(max_bytes: int, val_files_frac: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, val) uint8 tensors from the standard library's .py files, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise RuntimeError(f"no .py files under the standard library folder {root}")
    n_val = max(1, int(len(files) * val_files_frac))
    split = {"train": files[:-n_val], "val": files[-n_val:]}
    out, info = {}, {"stdlib": str(root), "files_total": len(files)}
    for name, group in split.items():
        budget = max_bytes if name == "train" else max(max_bytes // 8, 1 << 16)
        chunks, size = [], 0
        for path in group:
            data = path.read_bytes()
            chunks.append(data[: budget - size])
            size += len(chunks[-1])
            if size >= budget:
                break
        out[name] = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        info[f"{name}_files"] = len(group)
        info[f"{name}_bytes"] = size
    return out["train"], out["val"], info


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random windows of seq + 1 bytes: (inputs, targets), both (batch, seq) int64."""
    while True:
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        rows = torch.stack([data[s: s + seq + 1] for s in start.tolist()]).long()
        yield rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    layers: int = 4
    d: int = 256
    heads: int = 4
    d_expert: int = 256  # n, each expert's intermediate size
    experts: int = 16
    top_k: int = 2
    tile_m: int = 128
    seq: int = 256
    batch: int = 32  # T = batch * seq tokens per layer call
    steps: int = 300
    lr: float = 2e-3
    eval_every: int = 50
    eval_batches: int = 8


class Block(nn.Module):
    def __init__(self, cfg: Config, routing: str, backend: str, device, dtype):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = cfg.heads
        self.norm1 = nn.RMSNorm(cfg.d, **kw)
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False, **kw)
        self.proj = nn.Linear(cfg.d, cfg.d, bias=False, **kw)
        self.norm2 = nn.RMSNorm(cfg.d, **kw)
        self.moe = MoE(cfg.d, cfg.d_expert, cfg.experts, cfg.top_k, routing=routing, tile_m=cfg.tile_m,
                       backend=backend, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, d // self.heads).unbind(2)  # (B, S, h, dh)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, S, d))
        return x + self.moe(self.norm2(x))  # the MoE sees T = B*S tokens


class TinyMoELM(nn.Module):
    def __init__(self, cfg: Config, routing: str, backend: str, device=None, dtype=None):
        super().__init__()
        self.embed = nn.Embedding(256, cfg.d, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(cfg, routing, backend, device, dtype) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, S, d)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()  # (B, S, 256) logits, tied embedding

    def set_routing(self, routing: str) -> None:
        for block in self.blocks:
            block.moe.routing = routing


# ----------------------------------------------------------------------------------------------
# One run: train with one routing, evaluate with top-k
# ----------------------------------------------------------------------------------------------
def tokens_per_tile(cfg: Config) -> float:
    return cfg.batch * cfg.seq * cfg.top_k / (cfg.experts * cfg.tile_m)


@torch.no_grad()
def evaluate(model: TinyMoELM, val: torch.Tensor, cfg: Config, device) -> float:
    """Mean next-byte cross-entropy (nats) on fixed validation windows, routed by plain top-k."""
    model.eval()
    routing = model.blocks[0].moe.routing
    model.set_routing("topk")
    gen = torch.Generator().manual_seed(1234)  # the same windows for every run
    it = batches(val, cfg.batch, cfg.seq, gen)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = (t.to(device) for t in next(it))
        total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
    model.set_routing(routing)
    model.train()
    return total / cfg.eval_batches


def train(cfg: Config, routing: str, seed: int, train_data, val_data, backend: str, device, dtype) -> dict:
    torch.manual_seed(seed)  # the same initial weights for both routings
    model = TinyMoELM(cfg, routing, backend, device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
    data = batches(train_data, cfg.batch, cfg.seq, torch.Generator().manual_seed(seed))  # same batches
    curve, train_loss = [[0, evaluate(model, val_data, cfg, device)]], []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the below-condition run warns by design
        for step in range(1, cfg.steps + 1):
            x, y = (t.to(device) for t in next(data))
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            train_loss.append(loss.item())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                curve.append([step, evaluate(model, val_data, cfg, device)])
    return {
        "routing": routing, "seed": seed, "tokens_per_layer_call": cfg.batch * cfg.seq,
        "tokens_per_expert_per_tile": tokens_per_tile(cfg), "val_loss": curve, "final_val_loss": curve[-1][1],
        "train_loss_first": train_loss[0], "train_loss_last": sum(train_loss[-10:]) / len(train_loss[-10:]),
        "seconds": time.perf_counter() - start,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per (routing, tokens per tile): mean and spread of the final validation loss across seeds."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        groups.setdefault((r["routing"], r["tokens_per_expert_per_tile"]), []).append(r["final_val_loss"])
    out = []
    for (routing, ratio), losses in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        mean = sum(losses) / len(losses)
        out.append({"routing": routing, "tokens_per_expert_per_tile": ratio, "seeds": len(losses),
                    "final_val_loss_mean": mean, "final_val_loss_min": min(losses), "final_val_loss_max": max(losses)})
    return out


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"topk": "tab:blue", "token_rounding": "tab:orange"}
    for r in result["runs"]:
        steps, losses = zip(*r["val_loss"])
        low = r["tokens_per_expert_per_tile"] < 2
        label = f"{r['routing']} seed {r['seed']} (f_e/tile = {r['tokens_per_expert_per_tile']:g})"
        ax.plot(steps, losses, color=colors[r["routing"]], linestyle=":" if low else "-", alpha=0.85, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/byte, top-k eval)")
    ax.set_title(f"Tiny MoE LM on CPython's stdlib bytes ({result['environment']['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def run_all(cfg: Config, seeds: list[int], low_batch: int, max_bytes: int, backend: str, device, dtype,
            save=None) -> dict:
    """Every run (top-k and token rounding per seed, then one seed of both below the condition);
    ``save(result)`` is called after each run, so a time limit keeps the finished runs."""
    train_data, val_data, data_info = stdlib_bytes(max_bytes, 0.1)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "train_tiny_moe",
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "device": device_name,
                        "backend": backend, "dtype": str(dtype).replace("torch.", "")},
        "config": asdict(cfg), "low_tokens_batch": low_batch, "seeds": seeds, "data": data_info,
        "rounding_mode": "nearest", "eval_routing": "topk", "runs": [], "summary": [],
    }
    low = replace(cfg, batch=low_batch)
    plan = [(cfg, routing, seed) for seed in seeds for routing in ("topk", "token_rounding")]
    plan += [(low, routing, seeds[0]) for routing in ("topk", "token_rounding")]  # below the condition
    for run_cfg, routing, seed in plan:
        run = train(run_cfg, routing, seed, train_data, val_data, backend, device, dtype)
        result["runs"].append(run)
        result["summary"] = summarize(result["runs"])
        print(f"{routing:>14} seed {seed} f_e/tile {run['tokens_per_expert_per_tile']:g}: "
              f"val {run['final_val_loss']:.4f} ({run['seconds']:.1f} s)", flush=True)
        if save is not None:
            save(result)
    return result


def smoke_config() -> Config:
    # T*K/(E*tile_m) = 128*2/(4*16) = 4 at batch 4; 1 at the low batch of 1
    return Config(layers=1, d=32, heads=2, d_expert=32, experts=4, top_k=2, tile_m=16, seq=32, batch=4, steps=8,
                  lr=1e-2, eval_every=4, eval_batches=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--eval-every", type=int, default=Config.eval_every)
    p.add_argument("--batch", type=int, default=Config.batch, help="sequences per step (T = batch * seq)")
    p.add_argument("--low-batch", type=int, default=4, help="sequences per step of the below-condition run")
    p.add_argument("--max-bytes", type=int, default=8 << 20, help="training bytes read from the stdlib")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps of a tiny model (CI)")
    p.add_argument("--plot", metavar="JSON", help="only draw the docs figure from this result file")
    args = p.parse_args(argv)

    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), REPO / "docs" / "assets" / "figures" / "train_tiny_moe.png")
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        cfg, device, dtype, backend = smoke_config(), torch.device("cpu"), torch.float32, "reference"
        result = run_all(cfg, seeds, low_batch=1, max_bytes=1 << 18, backend=backend, device=device, dtype=dtype)
        print(json.dumps(result["summary"], indent=1))
        return 0
    if not torch.cuda.is_available():
        print("train_tiny_moe: the full run needs a CUDA GPU (use --smoke on the CPU)", file=sys.stderr)
        return 2
    cfg = replace(Config(), steps=args.steps, batch=args.batch, eval_every=args.eval_every)
    out = Path(args.out) / f"train_tiny_moe_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_all(cfg, seeds, args.low_batch, args.max_bytes, "fast", torch.device("cuda"), torch.bfloat16,
                     save=lambda res: out.write_text(json.dumps(res, indent=1)))
    print(f"wrote {out}")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
