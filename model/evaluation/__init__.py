"""Evaluation: FID, CLIP score, layer CLIP score and pixel layer-fidelity metrics."""
