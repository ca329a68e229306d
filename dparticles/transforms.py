"""The image transform a downsample batch applies, as a small picklable object that imports only
numpy and the kernels (it travels to the workers inside every batch task)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dparticles import kernels


@dataclass(frozen=True)
class Transform:
    """The per-batch image transform, picklable: crop/pad, then one FFT, window, ramp, filter."""

    crop_box: int | None
    out_boxes: tuple[int | None, ...]
    lowpass: float | None

    def __call__(self, images: np.ndarray, shifts: np.ndarray | None, pixel_sizes: np.ndarray) -> list[np.ndarray]:
        if self.crop_box is not None:
            images = kernels.crop_pad(images, self.crop_box)
        if self.lowpass is None and shifts is None and all(b in (None, images.shape[-1]) for b in self.out_boxes):
            return [images] * len(self.out_boxes)
        outs: list[list[np.ndarray]] = [[] for _ in self.out_boxes]
        # particles of different pixel sizes (optics groups) need their own filter; keep their order
        change = np.flatnonzero(np.diff(pixel_sizes)) + 1
        for lo, hi in zip(np.r_[0, change], np.r_[change, len(images)]):
            part = kernels.downsample(images[lo:hi], self.out_boxes, pixel_size=float(pixel_sizes[lo]),
                                      lowpass=self.lowpass, shifts=None if shifts is None else shifts[lo:hi])
            for k, p in enumerate(part):
                outs[k].append(p)
        return [np.concatenate(o) for o in outs]
