"""Layers: pure functions for the math, thin Linen modules that declare parameters."""
