"""The fused dH GEMM's time under routings that differ in one thing at a time (a probe, not a benchmark row).

Why this exists: on the paper's (16384, 1536, 1024), E = 32, K = 2 shape the dH GEMM (dSwiGLU
epilogue) took longer under token rounding than under top-k although token rounding gives it fewer
tiles (255 vs 270 row tiles of 128), while the up-projection and down-projection GEMMs got faster in
proportion to their tiles. This script times the dH GEMM (and the up-projection, as a control) on
the same inputs under:

1. ``topk``: the layer's top-k routing (experts' row counts 919..1155, so every expert's rows start
   anywhere and most experts end in a partial tile);
2. ``token_rounding``: the layer's token rounding, padded to the bound (every count a multiple of
   128, so every expert starts on a multiple of 128 rows and no tile is partial);
3. the same pairs without the padding rows (metadata of exactly P rows);
4. the same padded pairs, metadata rebuilt (the layer's own metadata vs ``build_metadata``);
5. (K = 2 only) a synthetic routing with T * K / E rows per expert when E divides T (token t to
   experts t and t + 1 mod E);
6. top-k with each expert's rows cut to a multiple of 128 (fewer rows, all tiles full, aligned);
7. the same minus one row per expert (one partial tile per expert, starts no longer aligned);
8. token rounding's pairs behind a dummy expert 0 owning ``--shift`` rows (8, then 64): the same
   tiles, every expert's rows starting off a multiple of 128.

Each row prints the rows, the true P, the row tiles, the partial tiles, and the median time of the
dH GEMM and of the up-projection, also per row tile. Unit row scores (the epilogue's arithmetic does
not branch on values). ``--dh-configs`` adds rows timing the dH GEMM on other grouped-GEMM configs
(``grouped_gemm_tiles.py``'s syntax), for example the ping-pong kernel, whose two consumer
warpgroups overlap one tile's epilogue with the other's MMAs: a test of the guess that uniform full
tiles keep every CTA's memory-bound epilogue in step (session 10's numbers, see the results file).
Needs a Hopper GPU::

    python benchmarks/dh_layout.py --shape 16384,1536,1024,32,2 --dh-configs pingpong:128x128x64:auto \\
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from sonic_learn.bench import layer_inputs, parse_layer_shape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16384,1536,1024,32,2", help="T,d,n,E,K")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per row (>= 1)")
    p.add_argument("--shifts", default="8,64", help="comma-separated row shifts of variant 8 (each >= 1)")
    p.add_argument("--dh-configs", default="", help="comma-separated extra dH GEMM configs "
                   "(grouped_gemm_tiles.py's syntax, e.g. pingpong:128x128x64:auto)")
    p.add_argument("--out", default=None, help="folder for dh_layout_<device>.json (default: print only)")
    args = p.parse_args(argv)
    shape = parse_layer_shape(p, args.shape)
    try:
        shifts = tuple(int(v) for v in args.shifts.split(",") if v.strip())
    except ValueError:
        p.error(f"--shifts takes integers, got {args.shifts!r}")
    if any(s < 1 or s > shape[0] for s in shifts):  # the dummy expert's rows are tokens 0 .. shift - 1
        p.error(f"--shifts must be between 1 and T = {shape[0]}, got {args.shifts!r}")
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from grouped_gemm_tiles import parse  # noqa: E402  (same folder; imports the kernels)

    from sonic_learn.fast import grouped_gemm as gg

    configs = [c.strip() for c in args.dh_configs.split(",") if c.strip()]
    twice = sorted({c for c in configs if configs.count(c) > 1})
    if twice:  # each names a column of the rows: a repeat would be timed once and silently dropped
        p.error(f"--dh-configs: configs given twice: {twice}")
    try:  # each a LayerGemms with that dH config, checked before any GPU work
        args.dh_configs = {c: gg.LayerGemms(dh=gg.GemmConfig(**parse(c))) for c in configs}
    except (ValueError, TypeError) as exc:
        p.error(f"--dh-configs: {exc}")
    args.shape, args.shifts = shape, shifts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("dh_layout needs a CUDA GPU", file=sys.stderr)
        return 2
    from sonic_learn import bench
    from sonic_learn.contracts import Routing
    from sonic_learn.fast import moe as fm
    from sonic_learn.fast import routing as fr

    T, d, n, E, K = args.shape
    tile_m = fm.GEMM_TILE_M  # the grouped GEMM's row tile
    x, router_w, w1, w2, dout = layer_inputs(args.shape, seed=0)  # the same draws as the session-10 probe
    ops = fm.fast_ops()
    dh_ops = {name: fm.fast_ops(gemm=gemms) for name, gemms in args.dh_configs.items()}
    rows_out = []

    def meta_of(tok, exp, num_experts, padded=False):
        r = Routing(tok.int(), exp.int(), torch.ones(tok.numel(), device="cuda"), T, num_experts)
        return fr.build_metadata(r, check_ids=False, padded=padded)

    def run(name, m, w1_=w1, w2_=w2):
        off = m.expert_offsets.long()
        cnt = off[1:] - off[:-1]
        tiles = int(((cnt + tile_m - 1) // tile_m).sum())
        h, _ = ops.gather_gemm_swiglu(x, w1_, m)
        row_scores = torch.ones(m.gather_idx.numel(), device="cuda")
        dh_us = bench.measure(lambda: ops.dh_gemm(dout, w2_, m, h, row_scores), device="cuda",
                              reps=args.reps).median_ms * 1e3
        up_us = bench.measure(lambda: ops.gather_gemm_swiglu(x, w1_, m), device="cuda", reps=args.reps).median_ms * 1e3
        row = {"routing": name, "rows": m.gather_idx.numel(), "pairs": int(off[-1]), "row_tiles": tiles,
               "partial_tiles": int((cnt % tile_m != 0).sum()), "first_offsets": off[:3].tolist(),
               "dh_us": dh_us, "dh_ns_per_row_tile": dh_us / tiles * 1e3, "up_us": up_us,
               "up_ns_per_row_tile": up_us / tiles * 1e3}
        extra = ""
        for cfg, cfg_ops in dh_ops.items():
            us = bench.measure(lambda cfg_ops=cfg_ops: cfg_ops.dh_gemm(dout, w2_, m, h, row_scores), device="cuda",
                               reps=args.reps).median_ms * 1e3
            row.setdefault("dh_us_by_config", {})[cfg] = us
            extra += f" | dh[{cfg}] {us:6.1f}us"
        rows_out.append(row)
        print(f"{name:38s} rows={row['rows']:6d} P={row['pairs']:6d} tiles={tiles:4d} "
              f"partial={row['partial_tiles']:3d} dh {dh_us:6.1f}us ({row['dh_ns_per_row_tile']:6.1f} ns/tile) "
              f"up {up_us:6.1f}us ({row['up_ns_per_row_tile']:6.1f}){extra}", flush=True)

    with torch.no_grad():
        topk = fm.route(x, router_w, K, routing="topk")
        run("1 topk", topk.meta)
        rounded = fm.route(x, router_w, K, routing="token_rounding")
        run("2 token_rounding (padded)", rounded.meta)
        logits = (x @ router_w).float()
        r2, _ = fr.layer_token_rounding(logits, K, tile_m=tile_m, mode="nearest", generator=None,
                                        scoring="softmax_topk", normalize=False)
        P = int(r2.rounding.kept_pairs)
        run("3 token_rounding unpadded meta", meta_of(r2.token_idx[:P], r2.expert_idx[:P], E))
        run("4 token_rounding padded meta (rebuilt)", meta_of(r2.token_idx, r2.expert_idx, E, padded=True))
        t = torch.arange(T, device="cuda")
        if K == 2:
            tok = t.repeat_interleave(K)
            exp = torch.stack([t % E, (t + 1) % E], 1).reshape(-1)
            run("5 synthetic T*K/E rows per expert", meta_of(tok, exp, E))
        pair_tok = t.repeat_interleave(K)
        pair_exp = fr.token_choice_experts(logits, K).reshape(-1)
        for minus, name in ((0, "6 topk cut to full tiles"), (1, "7 topk cut to full tiles - 1")):
            keep = torch.zeros_like(pair_exp, dtype=torch.bool)
            for e in range(E):
                idx = (pair_exp == e).nonzero().squeeze(1)
                keep[idx[: max((idx.numel() // tile_m) * tile_m - minus, 0)]] = True
            run(name, meta_of(pair_tok[keep], pair_exp[keep], E))
        tok, exp = r2.token_idx[:P].long(), r2.expert_idx[:P].long()
        w1x, w2x = torch.cat([w1[:1], w1]), torch.cat([w2[:1], w2])  # expert 0: the dummy in front
        for shift in args.shifts:
            dummy = torch.arange(shift, device="cuda")
            t2, e2 = torch.cat([dummy, tok]), torch.cat([torch.zeros_like(dummy), exp + 1])
            order = torch.argsort(t2 * (E + 1) + e2)  # token order, then expert order
            run(f"8 token_rounding shifted by {shift} rows", meta_of(t2[order], e2[order], E + 1), w1x, w2x)
    if args.out:
        record = {"benchmark": "dh_layout", "environment": bench.environment(),
                  "shape": dict(zip("T d n E K".split(), args.shape)), "reps": args.reps,
                  "timer": "sonic_learn.bench.measure (cuda events, L2 flushed, median)", "rows": rows_out}
        print(f"wrote {bench.write_record(record, args.out, 'dh_layout')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
