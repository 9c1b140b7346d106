"""Experiments: arms of training runs, ablations against a baseline, evaluation sweeps."""
