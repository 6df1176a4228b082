"""Starter modules, one per assignment: signatures, contracts in the docstrings, NotImplementedError bodies.

``python -m sonic_learn.course start NAME DIR`` copies ``NAME.py`` from here into the student's folder.
"""
