"""Thin modules over the dalle_fast ops."""
from .attention import BACKENDS, KVCache, SparseSelfAttention

__all__ = ["BACKENDS", "KVCache", "SparseSelfAttention"]
