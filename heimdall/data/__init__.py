"""Data: the synthetic world, recordings and their import, the Parquet dataset format, checks."""
