"""Training with Lightning: the module, `fit` (the local recipe), loaders, callbacks, run records."""
