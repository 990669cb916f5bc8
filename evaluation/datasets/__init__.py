"""Benchmark datasets: loaders of the published copies and offline generators (RULER)."""
