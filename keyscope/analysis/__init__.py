"""Analysis: keys, their covariance C = E[k kᵀ] and the whitened metric, predictions, the neighbour
scan and the causal trace.

Layer 4: above models and data; imports no editing code.
"""
