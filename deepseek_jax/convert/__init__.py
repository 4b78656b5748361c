"""Checkpoint conversion: HF transformers names <-> ours."""
