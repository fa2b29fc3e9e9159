"""Evaluation: metrics in metres and ellipse coverage, the physics baseline, reports and plots."""
