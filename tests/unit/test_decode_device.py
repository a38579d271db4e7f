"""Batched image decode on a device (``ray_io.decode_images``) and the fused decode of
the mining actors (``decode_batch(device=...)``, ``DecodingActor``), run on the CPU: the
same code takes ``device="cuda"`` on a GPU actor."""
import numpy as np
import pytest
import torch

from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import decode_image, encode_image


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with some texture (JPEG decoders agree closely on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_cpu_decode_uses_batched_decode_jpeg_and_matches_pil(monkeypatch):
    import torchvision.io

    images = [_photo(48, 64, 0), _photo(33, 20, 1), _photo(64, 64, 2)]
    data = [encode_image(im, "jpg") for im in images]
    calls = []
    real = torchvision.io.decode_jpeg

    def spy(inputs, *args, **kwargs):
        calls.append((len(inputs) if isinstance(inputs, list) else 1, str(kwargs.get("device"))))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    out, errors = ray_io.decode_images(data, device="cpu")
    assert calls == [(3, "cpu")]  # one batched call for all JPEGs, on the requested device
    assert errors == ["", "", ""]
    for t, d, im in zip(out, data, images):
        assert t.dtype == torch.uint8 and t.device.type == "cpu" and tuple(t.shape) == (3, *im.shape[:2])
        pil = torch.from_numpy(decode_image(d).copy()).permute(2, 0, 1).int()
        diff = (t.int() - pil).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8


def test_png_gray_corrupt_and_missing_fall_back_without_failing_the_batch():
    rgb, gray = _photo(20, 30, 3), _photo(16, 16, 4)[..., 0]
    data = [encode_image(rgb, "jpg"), encode_image(rgb, "png"), b"\xff\xd8\xff not a jpeg", None,
            encode_image(np.stack([gray] * 3, -1), "jpg"), b"garbage"]
    out, errors = ray_io.decode_images(data, device=torch.device("cpu"))
    assert [bool(e) for e in errors] == [False, False, True, True, False, True]
    assert errors[2].startswith("corrupt_image: ") and errors[5].startswith("corrupt_image: ")
    assert errors[3].startswith("missing_image: ")
    assert out[2] is None and out[3] is None and out[5] is None
    assert torch.equal(out[1], torch.from_numpy(rgb).permute(2, 0, 1))  # PNG via PIL: lossless
    assert tuple(out[0].shape) == (3, 20, 30) and tuple(out[4].shape) == (3, 16, 16)


def _raw_batch(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows], dtype=object) for k in ray_io.RAW_COLUMNS}


@pytest.fixture
def raw_rows():
    im = _photo(40, 50, 5)
    meta = b'{"labels": [1], "boxes": [[2, 3, 30, 35]], "box_labels": [1]}'
    return [
        {"key": "a", "shard": "s.tar", "image": encode_image(im, "jpg"), "image_ext": "jpg", "meta": meta, "error": ""},
        {"key": "b", "shard": "s.tar", "image": encode_image(im, "png"), "image_ext": "png", "meta": meta, "error": ""},
        {"key": "c", "shard": "s.tar", "image": b"\xff\xd8\xff bad", "image_ext": "jpg", "meta": meta, "error": ""},
        {"key": "d", "shard": "s.tar", "image": encode_image(im, "jpg"), "image_ext": "jpg", "meta": b'{"labels": [9]}',
         "error": ""},
        {"key": "__s.tar__truncated", "shard": "s.tar", "image": None, "image_ext": "", "meta": None,
         "error": "truncated_shard: ReadError: cut"},
    ]


def test_device_decode_batch_gives_the_rows_of_the_pil_stage(raw_rows):
    classes = ["x", "y"]
    pil = ray_io.decode_batch(_raw_batch(raw_rows), classes)
    dev = ray_io.decode_batch(_raw_batch(raw_rows), classes, device="cpu")
    assert list(dev["key"]) == list(pil["key"])
    kinds = [str(e).split(":")[0] for e in dev["error"]]
    assert kinds == [str(e).split(":")[0] for e in pil["error"]] == ["", "", "corrupt_image", "unknown_class",
                                                                       "truncated_shard"]
    for i in (0, 1):
        assert isinstance(dev["image"][i], np.ndarray) and dev["image"][i].shape == pil["image"][i].shape == (40, 50, 3)
        assert np.abs(dev["image"][i].astype(int) - pil["image"][i].astype(int)).mean() < 1.0
        assert np.array_equal(dev["boxes"][i], pil["boxes"][i]) and list(dev["labels"][i]) == [1]


class _Recorder:
    """Stands in for a compute actor: records what it was built with and given."""

    def __init__(self, device: str, threads=None, scale: int = 1):
        self.device, self.scale = device, scale

    def __call__(self, batch: dict) -> dict:
        return {"key": batch["key"], "error": batch["error"],
                "height": np.asarray([im.shape[0] * self.scale for im in batch["image"]])}


def test_decoding_actor_decodes_on_the_actors_device_then_runs_the_actor(raw_rows):
    actor = ray_io.DecodingActor(_Recorder, {"device": "cpu", "threads": 1, "scale": 2}, ["x", "y"])
    assert actor.device == "cpu" and actor.inner.scale == 2
    out = actor(_raw_batch(raw_rows))
    assert list(out["height"]) == [80, 80, 2, 2, 2]  # error rows carry the 1×1 placeholder
    assert ray_io.DecodingActor(_Recorder, {"device": "cuda:0"}, []).device == "cuda"
