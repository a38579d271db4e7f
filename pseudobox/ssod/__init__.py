"""Semi-supervised detection (EMA teachers, pseudo-label losses, class thresholds).

Empty until the semi-supervised issues land; `docs/architecture.md` says where they plug
into the fine-tuning stage (a second, unlabelled Ray dataset and the shared train loop).
"""
