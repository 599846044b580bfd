"""Models: the hybrid LM and its layers (linear-recurrent mixers, softmax attention, RoPE, MLP)."""
from .attention import Attention
from .hybrid import Block, HybridLM, LMCache, build_model
from .layers import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU
from .linear_mixers import DeltaNetMixer, Mamba2Mixer
from .rope import RotaryEmbedding, rope_inv_freq

__all__ = [
    "HybridLM", "build_model", "Block", "LMCache", "Attention", "DeltaNetMixer", "Mamba2Mixer",
    "RMSNorm", "GatedRMSNorm", "SwiGLU", "ShortConv", "RotaryEmbedding", "rope_inv_freq",
]
