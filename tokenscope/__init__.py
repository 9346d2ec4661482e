"""tokenscope: where do the tokens go in token-reduction ViT segmenters (STEP)?"""

__version__ = "0.1.0"
