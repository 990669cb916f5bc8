"""KVzap surrogates: KVzip+ training targets and the trainer behind ``kvpress-eval train-kvzap``."""
