"""Batched engines: ascent (activation maximization), forward passes, gradients."""
