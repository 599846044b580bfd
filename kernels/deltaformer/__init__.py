"""Deltaformer (the delta rule with a softmax kernel): u-pass + causal read-out. See ``api.py``."""
from .api import deltaformer, deltaformer_by_documents, deltaformer_u, deltaformer_u_by_documents

__all__ = ["deltaformer", "deltaformer_u", "deltaformer_by_documents", "deltaformer_u_by_documents"]
