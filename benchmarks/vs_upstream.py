"""Side by side on one GPU, in one run: sonic_learn's fast MoE layer, upstream sonic-moe, and a
``torch._grouped_mm`` layer.

Run on the GPU machine (upstream staged beside the project, e.g. by ``pack-with-upstream``)::

    SONIC_UPSTREAM_SITE=<upstream's site folders> python benchmarks/vs_upstream.py \
        [--configs 7b,30b,e256,1.4b,120b] [--reps 20] [--out DIR] [--upstream-timeout S] [--kernels]

Every row gets the same seeded bf16 inputs (generated once here; upstream's process reads the same
tensors from a file), the same timer (``sonic_learn.bench.measure``: median of CUDA events around
the device work, L2 flushed) and the same memory accounting
(``sonic_learn.compare.upstream.measure_layer``: peak over the forward, bytes held after it, peak
over forward + backward). Before anything is timed, the output and the four gradients of each
layer are checked against one oracle: a plain per-expert PyTorch loop in float32 (TF32 off) on the
same inputs, whose router logits are rounded to bf16 like every implementation's router GEMM.

Rows:

* ``sonic_learn``: ``sonic_learn.fast.moe.moe_forward`` (reduced-memory backward, top-K routing);
* ``upstream``: ``sonicmoe.functional.moe_TC_softmax_topk_layer`` in a subprocess whose
  ``PYTHONPATH`` starts with ``$SONIC_UPSTREAM_SITE`` (see ``sonic_learn.compare.upstream``);
* ``sonic_learn[<entry>]`` (``--gemm``, one row per entry): the same layer with other grouped-GEMM
  configs (``benchmarks/grouped_gemm_tiles.py``'s ``parse_layer`` syntax, per role or for every
  GEMM), timed after the default row, and the default again last (``sonic_learn[repeat]``: the
  drift between rows) -- an A/B of GEMM configs in the same run as upstream;
* ``grouped_mm``: what plain PyTorch offers (the torchtitan recipe): router GEMM, top-K + softmax,
  argsort the pairs by expert, gather the rows, ``torch._grouped_mm`` up, SwiGLU, ``torch._grouped_mm``
  down, scatter back and weight-sum each token's K rows; autograd for the backward.

JSON: ``benchmarks/results/vs_upstream_<device>.json`` (or ``--out``): one row per config with its
``config``, ``shape`` and per implementation ``fwd_ms``, ``fwdbwd_ms``, ``fwd_peak_bytes``,
``held_after_fwd_bytes``, ``fwdbwd_peak_bytes`` and the oracle errors (with ``--kernels`` also
``kernels_fwdbwd``: one forward + backward's device time per kernel, for the per-kernel comparison
with upstream's QuACK kernels), plus the ratios upstream / ours, the device and every version.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sonic_learn import bench
from sonic_learn.compare import upstream as up

CONFIGS = {  # (T, d, n, E, K)
    "7b": (24576, 1536, 256, 128, 8),
    "30b": (32768, 4096, 1024, 128, 8),
    "e256": (16384, 4096, 512, 256, 16),
    "1.4b": (40960, 768, 256, 128, 8),  # the paper's Table 9b, finest granularity
    "120b": (32768, 4096, 512, 256, 16),  # the paper's Table 9b, finest granularity
}
DEFAULT_CONFIGS = "7b,30b,e256"
IMPLS = ("sonic_learn", "upstream", "grouped_mm")
TOLERANCE = 2e-2  # relative error (Frobenius) of bf16 layers against the float32 oracle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated names from {sorted(CONFIGS)}")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--upstream-site", default=None,
                   help=f"upstream's site folder(s), {os.pathsep}-separated (default: ${up.SITE_ENV})")
    p.add_argument("--upstream-timeout", type=float, default=None, help="seconds for the whole upstream subprocess")
    p.add_argument("--skip", default="", help=f"comma-separated rows to leave out, from {IMPLS}")
    p.add_argument("--rounds", type=int, default=1,
                   help="our rows are measured in this many rounds, taking the rows in turn (drift between rows)")
    p.add_argument("--kernels", action="store_true",
                   help="also record where one forward + backward of each row spends its device time, kernel "
                        "by kernel (torch profiler, the 24 largest; upstream's in its own process)")
    p.add_argument("--gemm", default="",
                   help="comma-separated grouped-GEMM configs of our layer, each timed as an extra row "
                        "sonic_learn[<entry>] (grouped_gemm_tiles.py's parse_layer syntax, e.g. "
                        "up/dh=pingpong:128x128x64:auto+down/dx=ws:128x256x64:auto:sub32)")
    args = p.parse_args(argv)
    names = [c.strip().lower() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown or names} (choose from {sorted(CONFIGS)})")
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    if any(s not in IMPLS for s in skip):
        p.error(f"--skip: choose from {IMPLS}, got {skip}")
    if args.reps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--reps, --warmup and --rounds must be >= 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from grouped_gemm_tiles import parse_gemm_option  # noqa: E402  (same folder)

    args.gemm_variants = parse_gemm_option(p, args.gemm)  # {entry: a GemmConfig or a LayerGemms}
    args.config_names, args.skip_impls = names, skip
    return args


# ----------------------------------------------------------------------------------------------
# Inputs and the oracle
# ----------------------------------------------------------------------------------------------
def make_inputs(shape, *, seed: int, device: str | torch.device = "cuda", dtype=torch.bfloat16) -> dict:
    """Seeded inputs in sonic_learn's layout: x (T, d), router_w (d, E), w1 (E, d, 2n), w2 (E, n, d), dout."""
    T, d, n, E, K = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

    return {"x": randn(T, d), "router_w": randn(d, E, scale=d**-0.5), "w1": randn(E, d, 2 * n, scale=d**-0.5),
            "w2": randn(E, n, d, scale=n**-0.5), "dout": randn(T, d), "k": K}


def oracle(case: dict) -> dict:
    """Plain per-expert loop in float32 (TF32 off), differentiated by autograd.

    Routing as every implementation: logits = x @ router_w rounded to bf16 (straight-through, so the
    router gradient is not rounded), top-K with ties to the lower expert, softmax over the K picks.
    """
    k = case["k"]
    leaves = [case[n].detach().float().requires_grad_(True) for n in ("x", "router_w", "w1", "w2")]
    x, rw, w1, w2 = leaves
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact = x @ rw  # (T, E)
        logits = exact + (exact.to(case["x"].dtype).float() - exact).detach()
        order = torch.sort(logits.detach(), dim=1, descending=True, stable=True).indices[:, :k]  # (T, K)
        scores = torch.softmax(logits.gather(1, order), dim=1)  # (T, K)
        out = torch.zeros_like(x)
        for e in range(w1.shape[0]):
            tok, slot = (order == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok] @ w1[e]  # (T_e, 2n)
            a = F.silu(h[:, 0::2]) * h[:, 1::2]  # (T_e, n), gate/up interleaved
            out = out.index_add(0, tok, (a @ w2[e]) * scores[tok, slot, None])
        grads = torch.autograd.grad(out, leaves, case["dout"].float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"out": out.detach(), **dict(zip(up.GRAD_NAMES, grads))}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN-safe: a NaN anywhere gives inf)."""
    a64, b64 = a.double(), b.double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


def check(outputs: dict, ref: dict, tol: float = TOLERANCE) -> dict:
    """{name: rel_err} for the output and the four gradients, and "ok" when all are within ``tol``."""
    errors = {n: rel_err(outputs[n].to(ref[n].device), ref[n]) for n in ("out", *up.GRAD_NAMES)}
    return {"errors": errors, "ok": all(e <= tol for e in errors.values()), "tolerance": tol}


# ----------------------------------------------------------------------------------------------
# The torch._grouped_mm layer (what plain PyTorch offers)
# ----------------------------------------------------------------------------------------------
def grouped_mm_moe(x, router_w, w1, w2, k):
    """MoE layer from torch ops and ``torch._grouped_mm``: permute, two grouped GEMMs, unpermute."""
    T, d = x.shape
    E = w1.shape[0]
    logits = (x @ router_w).float()  # (T, E)
    top, experts = torch.topk(logits, k, dim=1)  # (T, K)
    scores = torch.softmax(top, dim=1)  # (T, K)
    flat = experts.reshape(-1)  # (P,) pair p = t*K + j
    order = torch.argsort(flat, stable=True)  # (P,) grouped row -> pair
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each expert (no host sync)
    xs = x[order // k]  # (P, d) permute: gather the token of each grouped row
    h = torch._grouped_mm(xs, w1, offs=offs)  # (P, 2n)
    a = F.silu(h[:, 0::2]) * h[:, 1::2]  # (P, n)
    y = torch._grouped_mm(a, w2, offs=offs)  # (P, d)
    y_pairs = torch.empty_like(y).index_copy(0, order, y)  # (P, d) unpermute to pair order
    return torch.bmm(scores.to(x.dtype).unsqueeze(1), y_pairs.view(T, k, d)).squeeze(1)  # (T, d)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def _leaves(case: dict) -> list[torch.Tensor]:
    return [case[n].detach().clone().requires_grad_(True) for n in ("x", "router_w", "w1", "w2")]


def local_rows(layers: list, case: dict, ref: dict, *, warmup: int, reps: int, rounds: int = 1,
               kernels: bool = False) -> dict:
    """``{name: row}`` for ``layers`` = [(name, layer)]: each checked against the oracle, then measured
    (if it passed) in ``rounds`` rounds that take the layers in turn, so that a slow drift of the
    GPU's clocks over the run reaches every layer alike. The times are the medians over the rounds
    of each round's median (each round's times are kept in ``round_fwd_ms`` / ``round_fwdbwd_ms``);
    the memory figures come from the first round (they do not change between rounds), and so does
    ``kernels_fwdbwd`` with ``kernels`` (``up.measure_layer``)."""
    rows, runnable = {}, {}
    for name, layer in layers:
        leaves = _leaves(case)
        forward = (lambda layer=layer, leaves=leaves: layer(*leaves, case["k"]))
        try:
            verdict = check(up.run_once(forward, leaves, case["dout"]), ref)
        except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        if not verdict["ok"]:
            rows[name] = {"check": verdict, "error": "outside the oracle's tolerance: not timed"}
            continue
        rows[name], runnable[name] = {"check": verdict}, (forward, leaves)
    measured: dict = {name: [] for name in runnable}
    for i in range(rounds):
        for name, (forward, leaves) in runnable.items():
            measured[name].append(up.measure_layer(forward, leaves, case["dout"], warmup=warmup, reps=reps,
                                                   kernels=kernels and i == 0))
    for name, runs in measured.items():
        rows[name].update(runs[0])
        if rounds > 1:
            for key in ("fwd_ms", "fwdbwd_ms"):
                rows[name][f"round_{key}"] = [r[key] for r in runs]
                rows[name][key] = statistics.median(r[key] for r in runs)
            rows[name]["rounds"] = rounds
    return rows


def upstream_row(run: up.UpstreamRun | None, ref: dict, note: str) -> dict:
    if run is None:
        return {"error": note or "the upstream worker did not reach this config"}
    if run.error:
        return {"error": run.error, "versions": run.record.get("versions")}
    verdict = check(run.outputs, ref)
    row = {k: v for k, v in run.record.items() if k != "inputs"}
    row["check"] = verdict
    if not verdict["ok"]:
        row["error"] = "outside the oracle's tolerance: its timings are not comparable"
    return row


def ours_impls(row: dict) -> list[str]:
    """The row's sonic_learn entries: the default layer, then the ``--gemm`` variants in their order."""
    return [k for k in row if k == "sonic_learn" or k.startswith("sonic_learn[")]


def build_record(rows: list[dict], versions: dict) -> dict:
    """The JSON: rows with ratios (upstream / ours: above 1 means sonic_learn is faster / lighter)."""
    for row in rows:
        theirs = row["upstream"]
        for impl in ours_impls(row):  # "sonic_learn" (the default) first, then the --gemm variants
            ours, ratios = row[impl], {}
            for key in ("fwd_ms", "fwdbwd_ms"):
                if ours.get(key) and theirs.get(key) and "error" not in ours and "error" not in theirs:
                    ratios[key.replace("_ms", "") + "_upstream_over_ours"] = theirs[key] / ours[key]
            for key in ("fwd_peak_bytes", "held_after_fwd_bytes", "fwdbwd_peak_bytes"):
                if ours.get(key) and theirs.get(key) and "error" not in ours and "error" not in theirs:
                    ratios[key.replace("_bytes", "") + "_ours_over_upstream"] = ours[key] / theirs[key]
            row["ratios" if impl == "sonic_learn" else f"ratios{impl[len('sonic_learn'):]}"] = ratios
    return {"benchmark": "vs_upstream", "environment": bench.environment(), "versions": versions,
            "tolerance": TOLERANCE, "rows": rows}


def summary(record: dict) -> str:
    lines = [f"{'config':6s} {'impl':12s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'peak GB':>8s} {'held GB':>8s}  max err"]
    for row in record["rows"]:
        for impl in ours_impls(row) + [i for i in IMPLS if i != "sonic_learn"]:
            r = row.get(impl, {})
            if "error" in r and "fwd_ms" not in r:
                lines.append(f"{row['config']:6s} {impl:12s} {r['error'][:90]}")
                continue
            err = max(r["check"]["errors"].values()) if "check" in r else float("nan")
            lines.append(f"{row['config']:6s} {impl:12s} {r.get('fwd_ms', float('nan')):8.3f} "
                         f"{r.get('fwdbwd_ms', float('nan')):11.3f} {(r.get('fwdbwd_peak_bytes') or 0) / 1e9:8.3f} "
                         f"{(r.get('held_after_fwd_bytes') or 0) / 1e9:8.3f}  {err:.2e}")
        for key in [k for k in row if k.startswith("ratios") and row[k]]:
            lines.append(f"       {key} " + ", ".join(f"{k}={v:.3f}" for k, v in row[key].items()))
        for impl in ("sonic_learn", "upstream"):  # --kernels: the largest kernels of one forward + backward
            for k in row.get(impl, {}).get("kernels_fwdbwd", [])[:8]:
                lines.append(f"       {impl} kernel {k['us_per_call']:9.1f} us x{k['launches_per_call']:g}  {k['kernel'][:70]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("vs_upstream needs a CUDA GPU", file=sys.stderr)
        return 2
    from sonic_learn.fast import moe as fast_moe

    def ours(x, rw, w1, w2, k):
        return fast_moe.moe_forward(x, rw, w1, w2, k)

    def variant(gemm):  # the same layer, its grouped GEMMs on another config (kernels called directly)
        ops = fast_moe.fast_ops(gemm)
        return lambda x, rw, w1, w2, k: fast_moe.moe_forward(x, rw, w1, w2, k, ops=ops)

    local = [("sonic_learn", ours)] + [(f"sonic_learn[{e}]", variant(g)) for e, g in args.gemm_variants.items()]
    if args.gemm_variants:  # the default again, last: how far the rows drift apart over the run
        local.append(("sonic_learn[repeat]", ours))
    local.append(("grouped_mm", grouped_mm_moe))

    shapes = {name: CONFIGS[name] for name in args.config_names}
    # Upstream first, in its own process, while this one holds no tensors (inputs go by file).
    runs: dict[str, up.UpstreamRun | None] = {name: None for name in shapes}
    note = "skipped (--skip upstream)"
    if "upstream" not in args.skip_impls:
        site, why = up.upstream_site(args.upstream_site)
        if site is None:
            note = why
        else:
            cases = [{n: (v.cpu() if isinstance(v, torch.Tensor) else v)
                      for n, v in make_inputs(shape, seed=args.seed).items()} for shape in shapes.values()]
            torch.cuda.empty_cache()
            t0 = time.perf_counter()
            found, note = up.run_upstream(cases, site=site, warmup=args.warmup, reps=args.reps,
                                          timeout_s=args.upstream_timeout, kernels=args.kernels)
            del cases
            print(f"upstream worker: {time.perf_counter() - t0:.0f} s {note}", flush=True)
            runs = dict(zip(shapes, found))
    rows = []
    versions = {"sonic_learn": bench.environment()["sonic_learn"], "torch": torch.__version__}
    for name, shape in shapes.items():
        case = make_inputs(shape, seed=args.seed)
        ref = oracle(case)
        torch.cuda.empty_cache()
        row = {"config": name, "shape": dict(zip(("T", "d", "n", "E", "K"), shape))}
        todo = [(impl, layer) for impl, layer in local if impl.split("[")[0] not in args.skip_impls]
        row.update({impl: {"error": "skipped"} for impl, _ in local if impl.split("[")[0] in args.skip_impls})
        row.update(local_rows(todo, case, ref, warmup=args.warmup, reps=args.reps, rounds=args.rounds,
                              kernels=args.kernels))
        row = {k: row[k] for k in ["config", "shape"] + [impl for impl, _ in local]}  # the rows in their order
        torch.cuda.empty_cache()
        row["upstream"] = upstream_row(runs[name], ref, note)
        if runs[name] is not None and runs[name].record.get("versions"):
            versions["upstream"] = runs[name].record["versions"]
        rows.append(row)
        del case, ref
        torch.cuda.empty_cache()
        print(f"{name}: done", flush=True)
    record = build_record(rows, versions)
    path = bench.write_record(record, args.out, "vs_upstream")
    print(summary(record))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
