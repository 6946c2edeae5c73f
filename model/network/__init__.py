"""The LayerDiff network: the layer-collaborative UNet, its attention blocks and the prompt enhancer."""
