"""Fallback for a missing pydensecrf: the official ``utils/dcrf.py`` imports it; training never runs the CRF."""
