"""The model: LocalizationNet, its spectral features, the Gaussian loss and the fitted normalisation."""
