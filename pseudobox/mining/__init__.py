"""Pseudo-box sources (CAM now; EdgeBoxes and teachers later) and their per-shard outputs."""
