"""sonic_learn: learn how SonicMoE makes Mixture-of-Experts training fast.

Every idea of SonicMoE (Guo et al., arXiv 2512.14080) comes as a pair -- the classic algorithm and
SonicMoE's -- and every algorithm exists twice: a readable PyTorch reference
(``sonic_learn.reference``) and a CuTe-DSL kernel for Hopper GPUs (``sonic_learn.fast``).
"""

__version__ = "0.1.0"

from sonic_learn.layer import MoE  # noqa: E402

__all__ = ["MoE", "__version__"]
