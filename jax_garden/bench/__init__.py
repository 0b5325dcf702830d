"""Benchmarks: ``python -m jax_garden.bench <fabric|moe>``; each prints a table, writes JSON and
runs its baselines in the same run."""
