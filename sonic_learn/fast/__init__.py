"""CuTe-DSL kernels for Hopper (sm_90a), with the same names and contracts as ``sonic_learn.reference``.

Kernels compile on any machine (no GPU needed: see ``sonic_learn.fast._cute``) and run on an H100/H200.
The types and checks shared with the reference are in ``sonic_learn.contracts``; device helpers
several kernels use are in ``primitives``; ``python -m sonic_learn.fast.topk`` (or ``.routing``)
validates and times every step of that kernel's ladder (``ladder``).
"""
