"""Readable PyTorch references for every SonicMoE component (CPU or GPU, plain PyTorch).

One module per component; inside each, the classic algorithm comes first and SonicMoE's second:

- ``topk``: radix select vs bitonic top-k (the router)
- ``routing``: token-choice top-k vs token rounding, and the routing metadata
- ``grouped_gemm``: naive (gather + pad + GEMM) vs gather-fused grouped GEMM
- ``moe``: the whole layer, standard vs reduced-memory backward

The routing types, option names and argument checks both paths share are in ``sonic_learn.contracts``.
"""
