"""Models: loading a checkpoint (Hugging Face, GGUF, factworld) as a HookedTransformer, its hook names
and weights, and the one capture primitive that reads activations.

Layer 2: above the infrastructure and factworld; imports no data, analysis or editing code.
"""
