"""lightmem_exp: a Hydra pipeline that writes memories into language models and measures the result."""

__version__ = "0.1.0"
