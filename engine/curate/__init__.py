"""Curation: plan and run a spec's stages, cache their outputs, top up short categories, commit."""
