"""Shared fixtures. Models are built from ultralytics yaml configs (nothing is downloaded),
once per session, and saved as .pt files under pytest's session tmp dir."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: never probe the network
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np
import pytest


def synth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic ``(h, w, 3)`` uint8 RGB test image: smooth colour field, discs, noise."""
    import cv2

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(h // 64, 2), max(w // 64, 2), 3), dtype=np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(max(4, h * w // 10000)):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, int(rng.integers(4, 40)), colour, -1)
    noise = rng.integers(-10, 11, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


#: BatchNorm variance inflation after calibration (gain / sqrt(1.5) per layer): at 1.0 the random
#: net is chaotic (±0.5/255 input noise moves scores by ~0.4), at 2.0 it ignores the image.
BN_DAMP = 1.5


def _build_detector(cfg: str, path, nc: int, seed: int, contrast: bool = True) -> None:
    """A random-init detector with ``nc`` classes, saved with ``YOLO.save``.

    ``contrast=False``: plain ultralytics init (every anchor scores ~1e-3, near-identical
    boxes), for tests that only need shapes. ``contrast=True``, to exercise the threshold and NMS
    paths with hundreds of boxes like a trained model: calibrate BatchNorm on a synthetic 640-px
    image (one train-mode forward, cumulative statistics), damp it by ``BN_DAMP`` so that the
    net is smooth in its input, then re-draw the last box/class convs of every head branch and
    scale them so that logits vary: class logits of std ~0.75 (0.3 for the end-to-end branch,
    whose top-K would otherwise saturate at 1.0) around per-class biases in [-2.5, -1]; box
    sides of ~2 strides. Scores then spread over (0, 1).
    """
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    wrapper = YOLO(cfg)
    net = DetectionModel(cfg, nc=nc, verbose=False)
    net.names = {i: f"class{i}" for i in range(nc)}
    net.args = dict(wrapper.model.args)
    if not contrast:
        wrapper.model = net
        wrapper.save(path)
        return
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    img = torch.from_numpy(synth_rgb(640, 640, 1000)).permute(2, 0, 1)[None].float() / 255
    net.train()
    with torch.no_grad():
        net(img)
    net.eval()
    for m in net.modules():  # damp every BN gain: contractive like a trained net, not chaotic
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var *= BN_DAMP
    head = net.model[-1]
    branches = [
        (getattr(head, box), getattr(head, cls), key, cls_std)
        for box, cls, key, cls_std in (
            ("cv2", "cv3", "one2many", 0.75),
            ("one2one_cv2", "one2one_cv3", "one2one", 0.3),
        )
        if getattr(head, box, None) is not None
    ]
    for box_heads, cls_heads, _, _ in branches:
        for c in [s[-1] for s in (*box_heads, *cls_heads)]:
            c.bias.data.zero_()
            c.weight.data.normal_(0, c.weight[0].numel() ** -0.5, generator=g)
    with torch.no_grad():
        preds = net(img)[1]
    for box_heads, cls_heads, key, cls_std in branches:
        p = preds.get(key, preds)
        s_cls, s_box = float(p["scores"].std()), float(p["boxes"].std())
        for c in [s[-1] for s in cls_heads]:
            c.weight.data *= cls_std / s_cls
            c.bias.data = torch.empty(nc).uniform_(-2.5, -1.0, generator=g)
        for c in [s[-1] for s in box_heads]:
            c.weight.data *= (1.5 if head.reg_max > 1 else 0.3) / s_box
            if head.reg_max > 1:  # DFL bin logits falling with distance: sides of ~2 strides
                c.bias.data = -0.5 * torch.arange(head.reg_max).float().repeat(4)
            else:  # distances in strides
                c.bias.data.fill_(2.0)
    wrapper.model = net
    wrapper.save(path)


@pytest.fixture(scope="session")
def yolo_pt(tmp_path_factory):
    """Factory ``yolo_pt(cfg, nc=3, seed=0, contrast=True)`` → Path of a saved model, built once
    per session.

    Detect configs (``yolo11n.yaml``, ``yolo26n.yaml``, ``yolov10n.yaml``) give a random model,
    with contrast unless ``contrast=False`` (see ``_build_detector``); other tasks (``yolo11n-seg.yaml`` …) are saved
    straight from ``YOLO(cfg)``.
    """
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(cfg: str, nc: int = 3, seed: int = 0, contrast: bool = True):
        key = (cfg, nc, seed, contrast)
        if key not in cache:
            path = (
                root
                / f"{cfg.removesuffix('.yaml')}-nc{nc}-s{seed}{'' if contrast else '-plain'}.pt"
            )
            if any(t in cfg for t in ("-seg", "-cls", "-pose", "-obb")):
                from ultralytics import YOLO

                YOLO(cfg).save(path)
            else:
                _build_detector(cfg, path, nc, seed, contrast)
            cache[key] = path
        return cache[key]

    return get
