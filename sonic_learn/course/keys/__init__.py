"""Instructor keys: the library's own implementations, arranged under each assignment's names.

For assignments 1-3 the key *is* the reference module (``sonic_learn.reference.topk``, ``.routing``,
``.grouped_gemm``): the assignment's functions have the reference's names and signatures. For
assignment 4 the pieces are inlined in ``sonic_learn.reference.moe``, so ``keys.backward`` exposes
them under the assignment's names; ``keys.cute_swiglu`` is the reference kernel of assignment 5.
``python -m sonic_learn.course grade NAME --reference`` grades a key (it must score 100%).
"""
