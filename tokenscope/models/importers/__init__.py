"""Importers: read foreign checkpoint formats safely and turn them into tokenscope models."""
