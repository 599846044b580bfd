"""lctrain: distributed long-context training for linear-recurrent and hybrid language models."""
__version__ = "0.1.0"
