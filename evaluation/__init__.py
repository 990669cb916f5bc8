"""kvpress-eval's evaluation harness: the ``kvpress-eval`` command, datasets, metrics and the sweep runner."""
