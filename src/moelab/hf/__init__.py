"""Hugging Face transformers interop."""
