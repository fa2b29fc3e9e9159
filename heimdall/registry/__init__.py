"""The registry: MLflow model versions and aliases, promotion, the serving copies' store."""
