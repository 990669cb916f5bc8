"""Builders of the per-model artifacts some presses load: DuoAttention patterns, Q-Filters, Fast KVzip gates.

Each writes the published layout into ``<output_dir>/<folder>``, where the press looks beside a local model. Texts come
from the KVzap trainer's sources (:func:`evaluation.kvzap.train.load_texts`): synthetic offline, nemotron, local files.
"""
