"""Sampling layered images: the pipeline, guidance, the editing applications and layered export."""
