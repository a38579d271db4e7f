"""PreDet on Ray: EdgeBoxes mined by the actor pool from an S3 corpus, then a 2-worker Ray
Train PreDet run that checkpoints to s3:// on the local S3 server and resumes."""
import pytest

from pseudobox import storage
from pseudobox.datasets.views import ViewConfig
from pseudobox.engine import OptimConfig
from pseudobox.mining import outputs
from pseudobox.mining.edgeboxes import EdgeBoxesConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.predet import PredetArch
from pseudobox.models.predet_loss import PredetLossConfig
from pseudobox.pipelines import mine, pretrain, trainer
from tests.conftest import make_corpus

pytestmark = pytest.mark.integration


def _pretrain_cfg(corpus, boxes, out, iters):
    arch = PredetArch(depth=18, frozen_bn=False, crop_size=64, anchor_sizes=(8, 16, 32, 64, 128),
                      rpn_pre_nms_top_n=100, rpn_post_nms_top_n=50, box_head_dim=64, embed_dim=32, num_queries=4)
    return pretrain.PretrainConfig(
        corpus=corpus, boxes=boxes, output=out, method="predet",
        # One term off (Table 1's "without L_cls"): its layers stay in the graph at weight 0,
        # which DDP across two workers needs to finish every step's gradient reduction.
        predet=pretrain.PredetSettings(arch=arch, loss=PredetLossConfig(max_negatives=32, cls=False),
                                       views=ViewConfig(crop_size=64), max_queries=20),
        optim=OptimConfig(lr=0.01, max_iters=iters, batch_size=2, warmup_iters=1, checkpoint_every=2, log_every=1,
                          grad_clip=10.0),
        workers=trainer.WorkersConfig(num_workers=2, use_gpu="false", max_failures=1))


def test_edgeboxes_then_predet_on_two_workers_checkpoints_to_s3_and_resumes(ray_local, s3_bucket):
    corpus, boxes, out = f"{s3_bucket}/corpus", f"{s3_bucket}/edgeboxes", f"{s3_bucket}/runs/predet"
    manifest = make_corpus(corpus, num_images=12, size=64, samples_per_shard=6)

    mined = mine.run(mine.MineConfig(corpus=corpus, output=boxes, source="edgebox", batch_size=4,
                                     edgebox=EdgeBoxesConfig(max_boxes=30, min_box_area=64)))
    assert mined["source"] == "edgebox" and mined["shards"] == len(manifest.shards) and mined["ok"] == 12
    part = outputs.load_mined_boxes(boxes, manifest.shards[0].name)
    assert part and all((labels == -1).all() for _, labels, _ in part.values())
    assert mined["boxes_per_image"] > 1

    first = pretrain.run(_pretrain_cfg(corpus, boxes, out, iters=2))
    assert first["step"] == 2 and [row["step"] for row in first["history"]] == [1, 2]
    assert "loss_info" in first["history"][0] and "loss_cls" not in first["history"][0]
    exported = load_checkpoint(out, expect_type="predet")
    assert exported["method"] == "predet" and "optimizer_state" not in exported
    assert exported["class_names"] == manifest.classes
    assert any(n.startswith("checkpoint_") for n in storage.listdir(out))

    second = pretrain.run(_pretrain_cfg(corpus, boxes, out, iters=4))
    assert second["step"] == 4
    assert [row["step"] for row in second["history"]] == [1, 2, 3, 4]  # resumed at 2, not restarted
    assert second["history"][:2] == first["history"]
