"""CuTe-DSL kernels for Hopper (sm_90a), with the same names and contracts as ``sonic_learn.reference``.

Kernels compile on any machine (no GPU needed: see ``sonic_learn.fast._cute``) and run on an H100/H200.
"""
