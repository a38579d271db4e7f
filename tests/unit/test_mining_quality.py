"""Mined boxes land on the objects: CorLoc of CAM boxes from a classifier trained here,
on synthetic scenes with known boxes, against the same miner with an untrained one."""
import numpy as np
import pytest
import torch

from pseudobox.datasets.corpus import iter_corpus
from pseudobox.mining.cam import CamBoxMiner
from pseudobox.mining.outputs import box_quality
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
from pseudobox.models.classifier import build_resnet, normalize_images
from tests.conftest import make_corpus

SCALES = (96, 160)


def _train_classifier(samples, num_classes: int, iters: int = 150, batch: int = 16) -> torch.nn.Module:
    """A plain single-process ResNet-18 training loop (cross-entropy, SGD, flips)."""
    torch.manual_seed(0)
    model = build_resnet(18, num_classes=num_classes)
    # Synthetic images vary in size a little: train on 96×96 resizes.
    images = torch.stack([torch.nn.functional.interpolate(normalize_images(torch.tensor(s["image"]))[None], size=(96, 96),
                                                          mode="bilinear", antialias=True)[0] for s in samples])
    targets = torch.tensor([int(s["labels"][0]) for s in samples])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=iters, pct_start=0.2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(iters):
        idx = torch.randint(len(samples), (batch,), generator=gen)
        x = images[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = torch.nn.functional.cross_entropy(model(x), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _corloc(miner: CamBoxMiner, samples) -> tuple[float, float]:
    totals = dict.fromkeys(("corloc_hits", "corloc_images", "gt_boxes", "gt_recalled"), 0)
    for start in range(0, len(samples), 32):
        chunk = samples[start:start + 32]
        mined = miner.mine([s["image"] for s in chunk], [np.asarray(s["labels"]) for s in chunk])
        for s, (boxes, labels, scores) in zip(chunk, mined):
            q = box_quality(boxes, labels, scores, s["labels"], np.asarray(s["boxes"]), np.asarray(s["box_labels"]))
            for k in totals:
                totals[k] += q[k]
    return 100 * totals["corloc_hits"] / totals["corloc_images"], 100 * totals["gt_recalled"] / totals["gt_boxes"]


@pytest.fixture(scope="module")
def trained_and_untrained(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("quality")
    manifest = make_corpus(str(root / "corpus"), num_images=400, size=96, samples_per_shard=200)
    samples = list(iter_corpus(str(root / "corpus")))
    train, held_out = samples[:320], samples[320:]
    model = _train_classifier(train, len(manifest.classes))
    trained = str(root / "trained.pt")
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, manifest.classes, model.state_dict()), trained)
    torch.manual_seed(0)
    untrained = str(root / "untrained.pt")
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, manifest.classes,
                                    build_resnet(18, num_classes=len(manifest.classes)).state_dict()), untrained)
    return (CamBoxMiner(trained, scales=SCALES, threads=2), CamBoxMiner(untrained, scales=SCALES, threads=2),
            held_out)


def test_trained_classifier_boxes_land_on_the_objects(trained_and_untrained):
    trained, untrained, held_out = trained_and_untrained
    corloc, recall = _corloc(trained, held_out)
    base_corloc, base_recall = _corloc(untrained, held_out)
    print(f"CorLoc {corloc:.1f}% (untrained {base_corloc:.1f}%), recall@0.5 {recall:.1f}% ({base_recall:.1f}%)")
    assert corloc >= 25.0
    assert corloc >= base_corloc + 10.0
    assert recall >= base_recall + 10.0
