"""LayerDiff pipeline folder (layered text-to-image). Load it with the installed `layerdiff` package:

    from model.sampling.pipeline import LayerDiffPipeline
    pipe = LayerDiffPipeline.from_pretrained("path/to/this/folder")

diffusers' custom-pipeline route, DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), runs this
file: it only imports that installed package (no code is downloaded).
"""

from model.sampling.pipeline import LayerDiffPipeline  # noqa: F401
