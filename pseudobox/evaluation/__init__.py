"""Detection metrics: COCO mAP (via pycocotools) and PASCAL VOC AP50."""

from pseudobox.evaluation.coco import coco_image_ids, evaluate_coco, gt_from_sample, to_coco_dets, to_coco_gt
from pseudobox.evaluation.voc import evaluate_voc, voc_ap

__all__ = [
    "coco_image_ids",
    "evaluate_coco",
    "evaluate_voc",
    "gt_from_sample",
    "to_coco_dets",
    "to_coco_gt",
    "voc_ap",
]
