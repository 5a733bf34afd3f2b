"""Fallback for a missing matplotlib: ``utils/imutils.py`` imports ``matplotlib.pyplot``, training never uses it."""
