"""Data: prompts and their tokens, fact files, corpora and the perturbed probes of a fact.

Layer 3: reads facts and text without running a model (corpus reads a model's name and card).
"""
