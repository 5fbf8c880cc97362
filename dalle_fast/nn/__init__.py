"""Thin modules over the dalle_fast ops."""
from .attention import BACKEND_ENV, BACKENDS, KVCache, SparseSelfAttention, resolve_backend

__all__ = ["BACKEND_ENV", "BACKENDS", "KVCache", "SparseSelfAttention", "resolve_backend"]
