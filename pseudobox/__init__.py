"""pseudobox: Ray-distributed detection pre-training and pseudo-labelling."""

__version__ = "0.1.0"
