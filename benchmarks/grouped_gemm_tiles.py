"""Tile sweep for the fast grouped GEMM (the "autotune" mode of issue 6, run by hand on the GPU).

    python benchmarks/grouped_gemm_tiles.py [--shapes 7b-up,...] [--configs v1:128x128x64:5,sm90:128x256x64:4]

Shapes: <config>-<projection>, config from benchmarks/grouped_gemm.py (7b, 30b), projection "up"
(K = d, N = 2n), "down" (K = n, N = d) or "dx" (the backward's dX~ = dH W1^T: K = 2n, N = d, the
weights stored (E, N, K) and read K-major with ``transpose_w=True``, as the MoE layer does).
For each shape (same definitions as benchmarks/grouped_gemm.py) and kernel config it checks the
result against torch (fp32 per expert) and times contiguous, gather-fused and varlen-K (and, for an
up-projection, the gather-fused GEMM with the fused SwiGLU epilogue, on the configs that run fused
epilogues: not the plain-store-only ping-pong 128 x 192 tile, ``GemmConfig.fused_epilogues``) in
``--rounds`` interleaved rounds (configs and the dense torch.matmul yardstick take turns, so clock
drift hits all alike; medians of the rounds); prints a table and writes JSON to $OUT (or
benchmarks/results/) as grouped_gemm_tiles_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from sonic_learn import bench
from sonic_learn.fast import grouped_gemm as fast

from grouped_gemm import CONFIGS, fp32_reference, make_inputs  # noqa: E402  (same folder)

DEFAULT_CONFIGS = "sm90:128x256x64:4,ws:128x256x64:3,ws:128x256x32:6"
PROJECTIONS = ("up", "down", "dx")  # (K, N) = (d, 2n), (n, d), (2n, d) with K-major weights


def parse(cfg: str):
    """kernel:MxNxK:stages[:notma][:c1|:c2][:subS][:pf|:pfN] (stages "auto": as many as fit next to each
    kernel's epilogue, so one config serves the fused epilogues too; notma: the persistent kernels'
    copy-out store instead of TMA; c1 / c2: clusters of 1 / 2 CTAs sharing B by TMA multicast;
    default: the library's choice; subS, e.g. sub64: "ws"'s subtiled TMA-store epilogue with S columns per subtile, GemmConfig's
    ``epi_subtile``; pfN, e.g. pf16: the dH epilogue's input prefetched into L2 N k-tiles ahead,
    ``epi_prefetch``; pf: N = ``EPI_PREFETCH_LEAD``). Returns the keyword arguments of ``GemmConfig``."""
    kernel, tile, stages, *flags = cfg.split(":")
    unknown = [f for f in flags
               if f not in ("notma", "c1", "c2", "pf") and not (f.startswith("sub") and f[3:].isdigit())
               and not (f.startswith("pf") and f[2:].isdigit())]
    if unknown:
        raise ValueError(f"config {cfg!r}: unknown flags {unknown} (known: notma, c1, c2, subS, pf, pfN)")
    cluster_m = 2 if "c2" in flags else 1 if "c1" in flags else None
    subtiles = [int(f[3:]) for f in flags if f.startswith("sub")]
    leads = [int(f[2:]) if f != "pf" else fast.EPI_PREFETCH_LEAD for f in flags if f.startswith("pf")]
    return dict(kernel=kernel, tile=tuple(int(v) for v in tile.split("x")),
                stages=None if stages == "auto" else int(stages),
                tma_store="notma" not in flags, cluster_m=cluster_m, epi_subtile=subtiles[-1] if subtiles else None,
                epi_prefetch=leads[-1] if leads else 0)


def parse_layer(entry: str):
    """One entry of benchmarks/moe.py's ``--gemm``: the GEMM configs of the whole MoE layer.

    Either one config in ``parse``'s syntax, for every GEMM of the layer (a ``GemmConfig``), or
    per-role parts joined by "+", each ``role[/role...]=config`` with roles from
    ``grouped_gemm.GEMM_ROLES`` (up, down, dh, dx, dw), e.g.
    ``up/dh=pingpong:128x128x64:auto+down/dx=ws:128x256x64:auto:sub32`` (a ``LayerGemms``). The roles
    not named run the entry's one bare part if it has one (``ws:128x256x64:auto:sub32+up=pingpong:
    128x128x64:auto``), else the library default. ("+", "=" and "/" never occur in a config, and the
    comma still separates entries.) Raises ValueError naming the entry."""
    def config(text: str):
        try:
            return fast.GemmConfig(**parse(text))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--gemm entry {entry!r}: config {text!r}: {exc}") from exc

    if "=" not in entry and "+" not in entry:
        every = config(entry)
        try:  # every role on it (e.g. a plain-store-only config cannot take the fused roles)
            fast.LayerGemms.uniform(every)
        except ValueError as exc:
            raise ValueError(f"--gemm entry {entry!r}: {exc}") from exc
        return every
    base, roles = None, {}
    for part in entry.split("+"):
        names, sep, text = part.rpartition("=")
        part_config = config(text)
        if not sep:
            if base is not None:
                raise ValueError(f"--gemm entry {entry!r}: more than one config without a role")
            base = part_config
            continue
        for role in names.split("/"):
            if role not in fast.GEMM_ROLES:
                raise ValueError(f"--gemm entry {entry!r}: unknown role {role!r}, choose from "
                                 f"{', '.join(fast.GEMM_ROLES)}")
            if role in roles:
                raise ValueError(f"--gemm entry {entry!r}: role {role!r} assigned twice")
            roles[role] = part_config
    default = base if base is not None else fast.DEFAULT_CONFIG
    try:
        return fast.LayerGemms(**{role: roles.get(role, default) for role in fast.GEMM_ROLES})
    except ValueError as exc:
        raise ValueError(f"--gemm entry {entry!r}: {exc}") from exc


def parse_gemm_option(parser: argparse.ArgumentParser, text: str | None) -> dict:
    """A ``--gemm`` option (benchmarks/moe.py, vs_upstream.py, token_rounding.py): comma-separated
    entries in ``parse_layer``'s syntax, as {entry: GemmConfig or LayerGemms} in their order. Each
    entry names a row, so an entry given twice, like a bad one, ends the script through
    ``parser.error`` (naming it) before any GPU work."""
    entries = [e.strip() for e in (text or "").split(",") if e.strip()]
    twice = sorted({e for e in entries if entries.count(e) > 1})
    if twice:
        parser.error(f"--gemm: entries given twice: {twice} (rows are named by their entry: spell a repeat another "
                     "way, e.g. the default everywhere as up=ws:128x256x64:auto)")
    try:
        return {entry: parse_layer(entry) for entry in entries}
    except ValueError as exc:  # (it names the entry)
        parser.error(str(exc))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="7b-up,7b-down,30b-up,30b-down",
                   help=f"comma-separated <config>-<projection>, config from {sorted(CONFIGS)}, projection from "
                        f"{PROJECTIONS}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configs (median taken)")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = p.parse_args()
    bad = [s for s in args.shapes.split(",")
           if s.partition("-")[0] not in CONFIGS or s.partition("-")[2] not in PROJECTIONS]
    if bad:
        p.error(f"--shapes: unknown {bad} (<config>-<projection>, config from {sorted(CONFIGS)}, projection from "
                f"{PROJECTIONS})")
    out = {"environment": bench.environment(), "rounds": args.rounds, "reps": args.reps, "rows": []}
    configs = args.configs.split(",")
    for shape in args.shapes.split(","):
        cfg, proj = shape.split("-")
        T, d, n, E, K = CONFIGS[cfg]
        Kg, Ng = {"up": (d, 2 * n), "down": (n, d), "dx": (2 * n, d)}[proj]
        meta, x, w, a, b = make_inputs(T, Kg, Ng, E, K)
        ref = fp32_reference(a, w, meta)
        kmajor = proj == "dx"  # dX~: W1 stored (E, d, 2n) = (E, N, K), read K-major
        w_op = w.transpose(1, 2).contiguous() if kmajor else w
        flops = 2 * a.shape[0] * Kg * Ng
        def calls(config):
            """The GEMMs of this shape on ``config``'s kernel; an up-projection adds the gather-fused
            GEMM with the SwiGLU epilogue (H and A = SwiGLU(H), as the MoE layer's forward runs it)."""
            fns = {
                "contiguous": lambda: fast.contiguous_grouped_gemm(a, w_op, meta, transpose_w=kmajor, config=config),
                "gather_fused": lambda: fast.gather_fused_grouped_gemm(x, w_op, meta, transpose_w=kmajor,
                                                                       config=config),
                "varlen_k": lambda: fast.grouped_gemm_varlen_k(x, b, meta, config=config),
            }
            if proj == "up" and config.fused_epilogues:  # (a plain-store-only config: no SwiGLU row)
                fns["gather_fused_swiglu"] = lambda: fast.gather_fused_grouped_gemm_swiglu(x, w, meta, config=config)
            return fns

        rows, usable = {}, []
        for c in configs:  # check every config once (and compile it) before any timing
            try:
                fns = calls(fast.GemmConfig(**parse(c)))
                err = ((fns["contiguous"]().float() - ref).abs().max() / ref.abs().max()).item()
                for fn in fns.values():
                    fn()
                rows[c] = {"shape": shape, "config": c, "rel_err": err, "samples_ms": {k: [] for k in fns},
                           "calls": fns}
                if "gather_fused_swiglu" in fns:  # H of the fused epilogue is the gathered rows' product too
                    h = fns["gather_fused_swiglu"]()[0].float()
                    rows[c]["swiglu_h_rel_err"] = ((h - ref).abs().max() / ref.abs().max()).item()
                usable.append(c)
            except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                rows[c] = {"shape": shape, "config": c, "error": f"{type(exc).__name__}: {exc}"[:300]}
        # Rounds interleave the configs (and the dense yardstick), so that a clock or power drift
        # during the run shifts every contender alike; each number is the median of the rounds'
        # medians.
        mm = []
        for _ in range(args.rounds):
            mm.append(bench.measure(lambda: torch.matmul(a, w[0]), device="cuda", reps=args.reps).median_ms)
            for c in usable:
                for name, fn in rows[c]["calls"].items():
                    rows[c]["samples_ms"][name].append(bench.measure(fn, device="cuda", reps=args.reps).median_ms)
        t_mm = statistics.median(mm)
        print(f"{shape}: torch.matmul {flops / t_mm / 1e9:.0f} TFLOP/s (rounds: "
              f"{', '.join(f'{flops / t / 1e9:.0f}' for t in mm)})", flush=True)
        for c in configs:
            row = rows[c]
            row.pop("calls", None)
            if "samples_ms" in row:
                row["torch_matmul_tflops"] = flops / t_mm / 1e9
                for name, ts in row["samples_ms"].items():
                    row[name + "_tflops"] = flops / statistics.median(ts) / 1e9
            out["rows"].append(row)
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                         if k not in ("shape", "samples_ms")}, flush=True)
        del x, w, w_op, a, b, ref
        torch.cuda.empty_cache()
    print("wrote", bench.write_record(out, args.out, "grouped_gemm_tiles"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
