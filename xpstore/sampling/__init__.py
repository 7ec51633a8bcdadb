"""Prioritized sampling (DESIGN §6; docs/sampling.md):
sum-trees, the priority model, the sampler."""
