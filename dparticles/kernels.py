"""Pure numpy kernels for particle images: real-space crop/pad and Fourier downsampling.

One kernel per operation (:func:`crop_pad`, :func:`fourier_crop`, :func:`lowpass`, :func:`recenter`),
each the code of :func:`downsample` with only that operation's parameters, and the fused
:func:`downsample_chunk` that does them all with one FFT per image for several sizes.

Every function takes and returns float32 stacks shaped ``(n, box, box)`` (a leading particle
axis) and touches no files, dask or xarray. The FFTs are ``ducc0.fft`` (single precision,
multi-threaded): on batches of 256 x 256 float32 images it is the fastest of numpy.fft,
scipy.fft and ducc0.fft (see ``benchmarks/fft_choice.py``).

Conventions, all as RELION 3.1 does them (checked against its programs in
``tests/test_relion_reference.py``):

* Arrays are ``data[y, x]`` as ``mrcfile`` reads them; the centre pixel is ``box // 2``.
* Fourier indices are integers ``kx = 0 .. b//2`` (rfft2 columns) and
  ``ky = -((b-1)//2) .. b//2`` (rows; for even ``b`` the Nyquist row is taken as ``+b/2``),
  which is the order of RELION's ``FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM``. A frequency in cycles
  per input pixel is ``k / b``.
* The forward transform is unnormalised and the inverse is divided by the *input* pixel count
  ``b*b``, whatever the output box, so the mean (the DC term) is preserved: RELION's forward
  FFT divides by ``N`` and its inverse does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ducc0.fft
import numpy as np

__all__ = ["crop_pad", "downsample", "downsample_chunk", "fourier_box_for_pixel_size", "fourier_crop", "lowpass",
           "recenter", "task_peak_bytes"]

# Images per FFT call are padded to a multiple of this, so that an image's result does not depend on
# which others share its call (ducc0 vectorises across images; a partial group rounds differently).
# Then output is the same bits whatever the dask chunking or batch size.
FFT_GROUP = 16


def task_peak_bytes(n: int, box: int, crop_box: int | None, out_boxes: Sequence[int], *, itemsize: int = 4,
                    fourier: bool = True, split: bool = False) -> int:
    """Bytes that :func:`downsample_chunk` holds at its peak for ``n`` images of ``box`` pixels (stored
    with ``itemsize`` bytes a pixel, 4 being float32), cropped or padded to ``crop_box`` (None: no crop), then Fourier
    cropped to each of ``out_boxes`` (``fourier``: False when there is no Fourier pass, only the crop).

    What it counts: the input stack; its float32 copy (when the input is not float32), then the
    working images of the crop box ``C``; in the Fourier pass, for ``N`` images (``n`` rounded up to
    whole groups of :data:`FFT_GROUP`, which the FFTs are padded to): the padded working images (when
    ``N > n``), the rfft2 half-planes ``N * C * (C//2 + 1)`` complex64, and for each output box ``o``
    in turn the outputs of the boxes before it, the windowed half-plane of ``m = min(o, C)``, the
    zero-padded ``o`` half-plane when ``o > C``, the ``o``-box output and the phase ramp's
    temporaries; plus one set of per-task filter arrays of ``m`` (float64). ``split`` (a lowpass
    over several pixel sizes, filtered group by group) adds a copy of the working images and the
    outputs filled group by group. Python's and the worker's own memory are not counted.
    """
    groups = -(-n // FFT_GROUP) * FFT_GROUP
    c = box if crop_box is None else crop_box
    inputs = n * box * box * itemsize
    converted = 0 if itemsize == 4 else n * box * box * 4  # the float32 copy of (float16, int16) input
    if crop_box is None:  # the copy, if any, is the working stack
        work, peak = converted, inputs + converted
    else:  # the copy lives only while cropping
        work = n * c * c * 4
        peak = inputs + converted + work
    if not fourier:
        return peak
    spectra = groups * c * (c // 2 + 1) * 8 + (groups * c * c * 4 if groups > n else 0)
    done, top, filters = 0, 0, 0
    for o in out_boxes:
        m = min(o, c)
        half = groups * m * (m // 2 + 1) * 8
        padded = groups * o * (o // 2 + 1) * 8 if o > c else 0
        ramp = groups * (m + m // 2 + 1) * 16 * 3
        top = max(top, done + half + padded + groups * o * o * 4 + ramp)
        filters = max(filters, m * (m // 2 + 1) * 8 * 6)
        done += groups * o * o * 4
    if split:
        top += n * c * c * 4 + n * sum(o * o for o in out_boxes) * 4
    return max(peak, inputs + work + spectra + top + filters)


def _as_stack(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Return ``images`` as a C-contiguous float32 ``(n, b, b)`` array or raise ValueError."""
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"{name} must be a stack of square images shaped (n, box, box); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} have an empty box; got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_box(box: object, name: str = "box") -> int:
    if isinstance(box, bool) or not isinstance(box, int | np.integer) or box < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels; got {box!r}")
    return int(box)


def crop_pad(images: np.ndarray, box: int) -> np.ndarray:
    """Real-space crop or pad ``(n, b, b) -> (n, box, box)``, centred as RELION centres.

    The centre pixel ``b // 2`` of the input lands on ``box // 2`` of the output (RELION's
    ``setXmippOrigin`` + ``window``), for odd and even boxes alike. Pixels outside the input
    are filled with that image's own mean (RELION's ``--new_box`` fills them with 0 instead;
    inside the input's footprint the two agree exactly).

    Parameters
    ----------
    images : array (n, b, b)
        Real images; converted to float32.
    box : int
        Output box in pixels (>= 1).

    Returns
    -------
    numpy.ndarray, float32, shape (n, box, box)
        A new array (never a view of ``images``).

    Raises
    ------
    ValueError
        If ``images`` is not a stack of square images or ``box`` is not a positive integer.
    """
    stack = _as_stack(images)
    box = _check_box(box)
    n, b, _ = stack.shape
    off = b // 2 - box // 2  # input index of output pixel 0
    if box <= b:
        return stack[:, off:off + box, off:off + box].copy()
    out = np.empty((n, box, box), dtype=np.float32)
    out[...] = stack.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)[:, None, None]
    out[:, -off:-off + b, -off:-off + b] = stack
    return out


def fourier_box_for_pixel_size(box: int, pixel_size: float, target: float) -> int:
    """The even box that Fourier-crops ``box`` pixels of ``pixel_size`` Å nearest to ``target`` Å.

    The ideal box is ``x = box * pixel_size / target``; the result is the even integer nearest to
    ``x``, at least 2. A tie (``x`` an odd integer) goes to the larger box, so the achieved pixel
    size ``box * pixel_size / result`` is then finer than the target and nothing beyond the
    requested resolution is lost. If ``x >= box`` no downsampling is needed and ``box`` itself
    is returned, even if odd (upsampling is never chosen here).

    RELION's ``--rescale_angpix`` rounds ``x`` to the nearest integer and then drops an odd
    result by one (``ROUND(x)``, ``-= %2``), which is not always the nearest even box:
    for ``x = 119.47`` it gives 118 where this gives 120; for ``x = 63`` (a tie) it gives 62.

    Examples (box, pixel_size, target -> result): (128, 2.8, 5.6) -> 64; (128, 2.8, 3.0) -> 120;
    (256, 1.0, 256/63) -> 64; (320, 1.31, 6.55) -> 64; (128, 1.0, 0.5) -> 128; (128, 1.0, 1000) -> 2.

    Raises
    ------
    ValueError
        If ``box`` is not an integer >= 2, or a pixel size is not a finite positive number.
    """
    if isinstance(box, bool) or not isinstance(box, int | np.integer) or box < 2:
        raise ValueError(f"box must be an integer of at least 2 pixels; got {box!r}")
    for name, value in (("pixel_size", pixel_size), ("target", target)):
        if not (isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite pixel size in Å greater than 0; got {value!r}")
    ideal = int(box) * float(pixel_size) / float(target)
    if ideal >= box:
        return int(box)
    # nearest even; 1e-9 absorbs float noise so that an exact odd x counts as a tie, rounded up
    even = 2 * math.floor(ideal / 2.0 + 0.5 + 1e-9)
    return int(min(max(even, 2), box))


def _rows(out: int) -> np.ndarray:
    """Integer row frequencies ky of an ``out``-box rfft2, in storage order (Nyquist as +out/2)."""
    return np.concatenate([np.arange(0, out // 2 + 1), np.arange(-((out - 1) // 2), 0)])


def _lowpass_factor(r: np.ndarray, b: int, pixel_size: float, lowpass: float, edge_width: float) -> np.ndarray:
    """RELION's ``lowPassFilterMap`` on radii ``r`` (cycles per input pixel); see ``downsample``."""
    shell = math.floor(b * pixel_size / lowpass + 0.5)
    half = edge_width / 2.0
    low = max(0.0, (shell - half) / b)
    high = (shell + half) / b
    f = np.ones_like(r)
    if high > low:
        edge = (r > low) & (r <= high)
        f[edge] = 0.5 + 0.5 * np.cos(np.pi * (r[edge] - low) / (high - low))
    f[r > high] = 0.0
    return f


def downsample(images: np.ndarray, out_boxes: Sequence[int | None], *, pixel_size: float,
               lowpass: float | None = None, shifts: np.ndarray | None = None,
               edge_width: float = 2.0, threads: int = 1) -> list[np.ndarray]:
    """Fourier-crop (or -pad) a stack to one or more boxes, with optional recentring and lowpass.

    One forward real FFT per image; then, for each requested output box, the spectrum is
    windowed by RELION's convention, multiplied by the recentring phase ramp and the lowpass,
    and inverse-transformed once. Equals RELION 3.1's ``relion_image_handler --angpix P
    --rescale_angpix Q [--lowpass A --filter_edge_width W]`` and ``relion_preprocess --scale``
    to float32 rounding.

    Window (RELION's ``windowFourierTransform``). For an output box ``o`` the output spectrum
    holds input columns ``kx = 0 .. o//2`` and rows ``ky = 0 .. o//2`` and
    ``ky = -((o-1)//2) .. -1`` (for even ``o``: ``0 .. o/2`` and ``-(o/2-1) .. -1``; the output
    Nyquist row is the input's *positive* row ``+o/2``, not a Hermitian average). For ``o > b``
    (Fourier padding) the input coefficients are placed at the same ``(kx, ky)`` and, as RELION
    does, only those with ``kx**2 + ky**2 <= (b//2)**2`` are kept (no corners). The inverse FFT
    (size ``o``) is divided by ``b*b``, so a constant image stays the same constant.

    Centre. The centre pixel ``b//2`` lands on ``o//2``. For even ``b`` and ``o`` the window does
    this by itself (pixel ``x`` goes to ``x*o/b``), exactly as in RELION. When either box is odd,
    the ramp below also includes a constant shift of ``(o//2)*b/o - b//2`` input pixels in x and
    y, so that odd boxes stay centred (RELION accepts only even boxes here).

    Recentring. ``shifts[i] = (ox, oy)`` is particle i's origin in input pixels with RELION's
    sign; the image is shifted by ``+origin``: every coefficient is multiplied by
    ``exp(-2*pi*i*(kx*ox + ky*oy) / b)``, with the integer ``kx, ky`` above (RELION's
    ``shiftImageInFourierTransform``). An integer shift equals ``np.roll(image, (oy, ox),
    axis=(-2, -1))``; a sub-pixel shift is exact (no interpolation) for band-limited images.

    Lowpass (RELION's ``lowPassFilterMap``, shells of the *input* box ``b``)::

        shell = floor(b * pixel_size / lowpass + 0.5)          # the corner, an integer shell
        low   = max(0, shell - edge_width / 2) / b             # cycles per input pixel
        high  = (shell + edge_width / 2) / b
        r     = sqrt(kx**2 + ky**2) / b
        H(r)  = 1                                   if r <= low
                0.5 + 0.5 * cos(pi * (r - low) / (high - low))  if low < r <= high
                0                                   if r > high

    so the gain is 0.5 at ``shell / b`` (resolution ``b * pixel_size / shell`` Å, the lowpass
    rounded to the nearest shell) and 0 from ``shell + edge_width/2`` outwards. RELION reads
    ``--filter_edge_width`` as an integer and halves it with integer division (5 acts as 4, 1 as
    0 and then divides 0 by 0 at the corner); here ``edge_width`` is used as given and 0 means a
    hard cut keeping ``r <= shell / b``. For even integer widths the two are identical.

    Parameters
    ----------
    images : array (n, b, b)
        Real images; converted to float32.
    out_boxes : sequence of int or None
        Output boxes in pixels; ``None`` keeps ``b`` (useful for recentring or filtering only).
        Odd boxes are accepted.
    pixel_size : float
        Input pixel size in Å (used only by ``lowpass``).
    lowpass : float, optional
        Corner resolution in Å; None for no filter.
    shifts : array (n, 2), optional
        Origins ``(ox, oy)`` in input pixels, RELION's sign (see above).
    edge_width : float
        Width of the raised-cosine edge in Fourier shells of the input box (default 2, RELION's).
    threads : int
        Threads for the FFTs.

    Returns
    -------
    list of numpy.ndarray, float32, shapes (n, o, o)
        One stack per entry of ``out_boxes``, in order.

    Raises
    ------
    ValueError
        On a malformed stack, box, shift array, or a non-positive pixel size, lowpass,
        edge width or thread count.
    """
    stack = _as_stack(images)
    n, b, _ = stack.shape
    boxes = [b if o is None else _check_box(o, "out_boxes entry") for o in out_boxes]
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be a finite pixel size in Å greater than 0; got {pixel_size!r}")
    if lowpass is not None and not (math.isfinite(lowpass) and lowpass > 0):
        raise ValueError(f"lowpass must be a resolution in Å greater than 0, or None; got {lowpass!r}")
    if not (math.isfinite(edge_width) and edge_width >= 0):
        raise ValueError(f"edge_width must be a number of Fourier shells >= 0; got {edge_width!r}")
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be a positive integer; got {threads!r}")
    if shifts is not None:
        shifts = np.asarray(shifts, dtype=np.float64)
        if shifts.shape != (n, 2):
            raise ValueError(f"shifts must be shaped (n, 2) = ({n}, 2), one (ox, oy) per image; got {shifts.shape}")
        if not np.isfinite(shifts).all():
            raise ValueError("shifts must be finite; found NaN or infinity")
        if not shifts.any():
            shifts = None
    if not boxes:
        return []
    if n == 0:
        return [np.zeros((0, o, o), dtype=np.float32) for o in boxes]

    pad = -n % FFT_GROUP  # ducc0 rounds an image alike only within whole vector groups of images
    if pad:
        stack = np.concatenate([stack, np.zeros((pad, b, b), dtype=np.float32)])
        shifts = None if shifts is None else np.concatenate([shifts, np.zeros((pad, 2))])
    spec = ducc0.fft.r2c(stack, axes=(1, 2), forward=True, inorm=0, nthreads=int(threads))
    results = []
    for o in boxes:
        results.append(_one_box(spec, b, o, pixel_size, lowpass, shifts, edge_width, int(threads))[:n])
    return results


def _one_box(spec: np.ndarray, b: int, o: int, pixel_size: float, lowpass: float | None,
             shifts: np.ndarray | None, edge_width: float, threads: int) -> np.ndarray:
    """Window ``spec`` (the rfft2 of a b-box stack) to box ``o``, apply ramp and filter, invert."""
    n = spec.shape[0]
    m = min(o, b)  # the window common to input and output
    ky = _rows(m)  # integer row frequencies kept, in m-box storage order
    kx = np.arange(m // 2 + 1)
    cols = m // 2 + 1

    # one real factor per kept coefficient: normalisation, lowpass and (for padding) RELION's disc
    factor = np.full((m, cols), 1.0 / (b * b))
    r2 = kx[None, :] ** 2 + ky[:, None] ** 2
    if o > b:
        factor[r2 > (b // 2) ** 2] = 0.0
    if lowpass is not None:
        factor *= _lowpass_factor(np.sqrt(r2) / b, b, pixel_size, lowpass, edge_width)

    # the kept coefficients, rows in m-box order: input rows 0..m//2, then the negative rows
    top = m // 2 + 1
    bottom = m - top
    factor32 = factor.astype(np.float32)
    block = np.empty((n, m, cols), dtype=np.complex64)
    np.multiply(spec[:, :top, :cols], factor32[:top], out=block[:, :top])  # copy and scale in one pass
    if bottom:
        np.multiply(spec[:, b - bottom:, :cols], factor32[top:], out=block[:, top:])
    # keep the centre pixel b//2 on o//2: automatic for even b and o, a sub-pixel shift otherwise
    centre = (o // 2) * b / o - b // 2
    if centre != 0.0:
        shifts = np.full((n, 2), centre) if shifts is None else shifts + centre
    if shifts is not None:
        _apply_ramp(block, shifts, ky, kx, b)
    if o > b:
        win = np.zeros((n, o, o // 2 + 1), dtype=np.complex64)
        win[:, ky % o, :cols] = block
    else:
        win = block
    return ducc0.fft.c2r(win, axes=(1, 2), lastsize=o, forward=False, inorm=0, nthreads=threads,
                         allow_overwriting_input=True)


def _apply_ramp(block: np.ndarray, shifts: np.ndarray, ky: np.ndarray, kx: np.ndarray, b: int) -> None:
    """Multiply ``block`` (n, len(ky), len(kx)) in place by ``exp(-2*pi*i*(kx*ox + ky*oy)/b)`` per image."""
    # separable in x and y; angles in float64, reduced to within half a turn before exp
    tx = np.outer(shifts[:, 0], kx) / b
    ty = np.outer(shifts[:, 1], ky) / b
    ex = np.exp(-2j * np.pi * (tx - np.round(tx))).astype(np.complex64)
    ey = np.exp(-2j * np.pi * (ty - np.round(ty))).astype(np.complex64)
    block *= ey[:, :, None]
    block *= ex[:, None, :]


def fourier_crop(images: np.ndarray, box: int) -> np.ndarray:
    """Fourier-crop (or -pad) a stack to ``box``: :func:`downsample` to that one box. A stack of that
    box already comes back as it is (float32), with no FFT."""
    stack = _as_stack(images)
    if _check_box(box) == stack.shape[-1]:
        return stack
    return downsample(stack, [box], pixel_size=1.0)[0]


def lowpass(images: np.ndarray, pixel_size: float | np.ndarray, resolution: float) -> np.ndarray:
    """RELION's raised-cosine lowpass at ``resolution`` Å (see :func:`downsample`), each image
    filtered for its own pixel size: ``pixel_size`` one per image, or one for all."""
    stack = _as_stack(images)
    return _by_pixel_size(stack, pixel_size, [stack.shape[-1]], resolution, None)[0]


def recenter(images: np.ndarray, shift_x: np.ndarray, shift_y: np.ndarray) -> np.ndarray:
    """Shift each image by its origin ``(shift_x, shift_y)`` in pixels, RELION's sign, one per image
    or one for all: the exact Fourier phase ramp of :func:`downsample`."""
    stack = _as_stack(images)
    return downsample(stack, [None], pixel_size=1.0, shifts=_pairs(shift_x, shift_y, len(stack)))[0]


def _pairs(shift_x: np.ndarray, shift_y: np.ndarray, n: int) -> np.ndarray:
    """Shifts shaped (n, 2) as (ox, oy), from one value per image or one for all."""
    return np.stack([np.broadcast_to(shift_x, (n,)), np.broadcast_to(shift_y, (n,))], axis=1)


def _by_pixel_size(images: np.ndarray, psize: float | np.ndarray, boxes: Sequence[int],
                   lowpass: float | None, shifts: np.ndarray | None) -> list[np.ndarray]:
    """:func:`downsample`, with the images of each pixel size (``psize``, one per image or one for
    all) given their own lowpass filter; the pixel size matters only to the filter."""
    psize = np.broadcast_to(np.asarray(psize, dtype=np.float64), (len(images),))
    if lowpass is None or len(np.unique(psize)) < 2:
        return downsample(images, boxes, pixel_size=float(psize[0]) if len(psize) else 1.0, lowpass=lowpass,
                          shifts=shifts)
    outs = [np.empty((len(images), b, b), dtype=np.float32) for b in boxes]
    for p in np.unique(psize):
        sel = psize == p
        parts = downsample(images[sel], boxes, pixel_size=float(p), lowpass=lowpass,
                           shifts=None if shifts is None else shifts[sel])
        for out, part in zip(outs, parts):
            out[sel] = part
    return outs


def downsample_chunk(images: np.ndarray, psize: np.ndarray, shift_x: np.ndarray | None = None,
                     shift_y: np.ndarray | None = None, *, crop_box: int | None, boxes: tuple[int, ...],
                     lowpass: float | None) -> tuple[np.ndarray, ...]:
    """One chunk of :func:`dparticles.ops.downsample`, all its operations fused: crop/pad, then one
    FFT per image for all ``boxes``, with the lowpass and recentring of :func:`lowpass` and
    :func:`recenter` (``psize``, ``shift_x``, ``shift_y`` one per image or one for all). Returns one
    float32 stack per box. It lives here, beside the kernels, so that a worker running it imports
    numpy and ducc0 only."""
    if crop_box is not None:
        images = crop_pad(images, crop_box)
    shifts = None if shift_x is None else _pairs(shift_x, shift_y, len(images))
    if lowpass is None and shifts is None and all(b == images.shape[-1] for b in boxes):
        images = np.asarray(images, dtype=np.float32)
        return tuple(images for _ in boxes)
    return tuple(_by_pixel_size(images, psize, boxes, lowpass, shifts))


def downsample_chunk_one(images: np.ndarray, psize: np.ndarray, shift_x: np.ndarray | None = None,
                         shift_y: np.ndarray | None = None, **options) -> np.ndarray:
    """:func:`downsample_chunk` for one output box: the stack itself, so that a lazy array needs no
    task per chunk to pick it out of a tuple."""
    return downsample_chunk(images, psize, shift_x, shift_y, **options)[0]
