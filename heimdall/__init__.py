"""Heimdall: locate radio transmitters from IQ heard by several WebSDR receivers."""
__version__ = "0.1.0"
