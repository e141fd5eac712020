"""Backbones: the registry of pretrained networks (``registry``) and inference-graph rewrites
(``folding``)."""
