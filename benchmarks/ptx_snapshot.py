"""Write the sm_90a PTX of the grouped GEMM's kernel variants to a folder (no GPU needed), to prove
that a restructure of the kernel code changed nothing: snapshot before, snapshot after, compare.

    PYTHONPATH=<checkout> python benchmarks/ptx_snapshot.py DIR [name,name,...]
    cmp -s BEFORE/x.ptx AFTER/x.ptx   # for each file

PYTHONPATH must name the checkout to compile (run as a script, Python would otherwise import
whichever sonic_learn is installed); the first line printed is the package that was compiled.
Kernel entry names embed the module path, so compare across a file move after renaming those.

The variants: the production kernel's plain store, SwiGLU and dH epilogues, varlen-K and its
transposed store, each in clusters of 1 and 2 CTAs; ping-pong's plain store, SwiGLU and dH epilogues
and varlen-K, also in clusters of 1 and 2 CTAs; the ping-pong 128 x 192 tile's plain store (the
down-projection, and dX~ with K-major weights, in clusters of 1 and 2; the copy-out store) and the
cooperative kernel's 128 x 192 tile; an fp32 output; the two teaching steps.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from sonic_learn.fast import grouped_gemm as gg


def variants() -> dict[str, dict]:
    bf = torch.bfloat16
    found = {}
    for cm in (1, 2):
        ws = dict(dtype=bf, out_dtype=bf, tile=gg.WS_TILE, kernel="ws", cluster_m=cm)
        found[f"ws_plain_c{cm}"] = dict(variant="varlen_m", **ws)
        found[f"ws_swiglu_c{cm}"] = dict(variant="varlen_m_gather", epilogue="swiglu", **ws)
        found[f"ws_dh_c{cm}"] = dict(variant="varlen_m_gather", transposed=True, epilogue="dswiglu", **ws)
        found[f"ws_vk_c{cm}"] = dict(variant="varlen_k_gather", **ws)
        found[f"ws_vkT_c{cm}"] = dict(variant="varlen_k_gather", transposed=True, **ws)
        pp = dict(dtype=bf, out_dtype=bf, tile=gg.PINGPONG_TILE, kernel="pingpong", cluster_m=cm)
        found[f"pingpong_plain_c{cm}"] = dict(variant="varlen_m", **pp)
        found[f"pingpong_swiglu_c{cm}"] = dict(variant="varlen_m_gather", epilogue="swiglu", **pp)
        found[f"pingpong_dh_c{cm}"] = dict(variant="varlen_m_gather", transposed=True, epilogue="dswiglu", **pp)
        found[f"pingpong_vk_c{cm}"] = dict(variant="varlen_k_gather", **pp)
        pp192 = dict(dtype=bf, out_dtype=bf, tile=(128, 192, 64), kernel="pingpong", cluster_m=cm)
        found[f"pingpong192_down_c{cm}"] = dict(variant="varlen_m", **pp192)
        found[f"pingpong192_dx_c{cm}"] = dict(variant="varlen_m", transposed=True, **pp192)
    found["pingpong192_notma"] = dict(variant="varlen_m_gather", dtype=bf, out_dtype=bf, tile=(128, 192, 64),
                                      kernel="pingpong", tma_store=False)
    found["ws192_plain"] = dict(variant="varlen_m", dtype=bf, out_dtype=bf, tile=(128, 192, 64), kernel="ws")
    found["ws_fp32out"] = dict(variant="varlen_k", dtype=bf, out_dtype=torch.float32, tile=(128, 128, 64), kernel="ws")
    found["v1_gather"] = dict(variant="varlen_m_gather", dtype=bf, out_dtype=bf, tile=gg.TILE, kernel="v1")
    found["sm90_gather"] = dict(variant="varlen_m_gather", dtype=bf, out_dtype=bf, tile=gg.TILE, kernel="sm90")
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = argv[0]
    only = set(argv[1].split(",")) if len(argv) > 1 else None
    os.makedirs(out_dir, exist_ok=True)
    print(f"compiling {os.path.dirname(gg.__file__)}", flush=True)
    for name, kwargs in variants().items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        ptx = gg.compile_grouped_gemm(keep_ptx=True, **kwargs).__ptx__
        with open(os.path.join(out_dir, name + ".ptx"), "w", encoding="utf-8") as f:
            f.write(ptx)
        print(f"{name}: {len(ptx)} bytes ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
