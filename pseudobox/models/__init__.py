"""Classifier + CAM, torchvision detector builders, the checkpoint format."""
