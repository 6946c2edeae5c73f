"""The pipeline's stage kinds and their order (no imports: the command-line help lists them without torch)."""

# DESIGN.md "Construction pipeline decisions": the paper's order, costly per-object work last.
STAGE_ORDER = ("caption", "detect", "segment", "saliency", "mask_rules", "object_caption", "cutout", "inpaint")
# Kinds that may be switched off (backend None): the global prompt then falls back to the source caption and a
# layer prompt to its detection label. Every other kind is needed to make a sample.
OPTIONAL_KINDS = ("caption", "object_caption")
# Kinds with model-backed backends: their micro-batch comes from `batch_sizes`.
MODEL_KINDS = ("caption", "detect", "segment", "saliency", "object_caption", "inpaint")
