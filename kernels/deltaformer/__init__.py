"""Deltaformer (the delta rule with a softmax kernel): u-pass + causal read-out. See ``api.py``."""
from .api import deltaformer, deltaformer_u

__all__ = ["deltaformer", "deltaformer_u"]
