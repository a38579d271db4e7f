"""Corpus format, Ray Data reading, transforms that carry boxes, synthetic scenes, splits."""
