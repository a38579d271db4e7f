"""Pseudo-box sources (CAM, teacher detections, class-agnostic EdgeBoxes) and their per-shard outputs."""
