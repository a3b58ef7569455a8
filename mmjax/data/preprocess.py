"""Graph-mode TensorFlow preprocessing ops for images and captions, for use inside `tf.data.Dataset.map`.

    fn = image_preprocess_fn(cfg, train=True, image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ds.map(lambda ex, seed: {"image": fn(ex["image"], seed), "caption": clean_text(ex["caption"])})

Images:

    decode_image         encoded jpeg / png / gif / bmp bytes -> uint8 [H, W, 3]
    resize               "exact" [size, size] or "shorter" side = size; bilinear, antialiased; float32 0..255
    center_crop          the central size x size
    random_resized_crop  Inception / torchvision crop (area, log-uniform aspect, 10 tries, central fallback) + resize
    random_flip          horizontal flip with probability 0.5
    rand_augment         RandAugment (Cubuk et al. 2020) on uint8 images, ViLT's pool (no Invert, no Cutout)
    apply_op             one RandAugment op by name, positive sign (RANDAUGMENT_OPS lists the names)
    normalize            float32 (x / 255 - mean) / std; NORMALIZATION holds presets, mean_std resolves them
    image_preprocess_fn  the above composed from a ConfigDict (default_image_config) -> fn(image, seed)

Text:

    clean_text           control characters and whitespace runs -> one space, stripped, optional lowercase

Randomness is stateless throughout: every random op takes `seed`, an int32 / int64 tensor of shape [2] (as
`tf.random.stateless_uniform` takes; equal values mean the same seed in either dtype), and splits it into
sub-seeds with `tf.random.experimental.stateless_split`, so an op's output is a pure function of (input, seed):
the pipeline's data order and augmentations replay exactly on a resume, on any number of workers.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TF import to quiet its C++ logging

import ml_collections
import tensorflow as tf

RESIZE_MODES = ("exact", "shorter")

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # ViLT and our tiny models
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# ViLT's fine-tuning pool: RandAugment without Invert and Cutout (both destroy what the captions / answers describe:
# colours, and possibly the object itself); Identity as in the RandAugment paper.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize", "Contrast", "Brightness",
    "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)

_MAX_MAGNITUDE = 10.0
_FILL = 128.0  # grey, for the pixels that geometric ops bring in from outside the image


# ----------------------------------------------------------------------------------------------- basic image ops


def _as_seed(seed) -> tf.Tensor:
    # stateless_split draws full-range integers of the seed's dtype: without the cast an int32 seed [a, b] and
    # an int64 seed [a, b] would give different augmentations.
    return tf.cast(seed, tf.int64)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded jpeg / png / gif / bmp bytes (scalar string) -> uint8 [H, W, 3]; a gif gives its first frame."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size: int, mode: str = "exact") -> tf.Tensor:
    """Bilinear, antialiased resize to [size, size] ("exact") or to shorter side = size, aspect kept ("shorter").

    Returns float32 in the input's 0..255 range (not normalised, not rounded).
    """
    if mode == "exact":
        out = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    elif mode == "shorter":
        shape = tf.shape(image)
        h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        short = tf.minimum(h, w)
        # The shorter side is set to `size` exactly rather than rounded from a scale factor, so a center crop of
        # size x size always fits.
        new_h = tf.where(h <= w, tf.constant(size, tf.float64), tf.round(h * size / short))
        new_w = tf.where(h <= w, tf.round(w * size / short), tf.constant(size, tf.float64))
        out = tf.image.resize(image, tf.cast(tf.stack([new_h, new_w]), tf.int32), method="bilinear",
                              antialias=True)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    return tf.cast(out, tf.float32)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size of an image at least that large (e.g. after a "shorter" resize)."""
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    crop = image[top:top + size, left:left + size]
    # ensure_shape also fails loudly (at run time) on an image smaller than `size`, where slicing would not.
    return tf.ensure_shape(crop, [size, size, image.shape[-1]])


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """Inception-style random crop (area fraction ~ U(scale), aspect w/h log-uniform in ratio) resized to
    [size, size] float32, following torchvision's RandomResizedCrop including its central fallback crop."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area_seed, ratio_seed, i_seed, j_seed = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), 4))

    # torchvision's 10 sequential attempts, drawn at once; the first that fits wins.
    attempts = 10
    target_area = hf * wf * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    ws = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    hs = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # Fallback: the whole image, or its central crop at the nearest allowed aspect ratio.
    in_ratio = wf / hf
    lo, hi = min(ratio), max(ratio)
    fb_w = tf.where(in_ratio > hi, tf.cast(tf.round(hf * hi), tf.int32), width)
    fb_h = tf.where(in_ratio < lo, tf.cast(tf.round(wf / lo), tf.int32), height)

    found = tf.reduce_any(fits)
    h = tf.where(found, hs[first], fb_h)
    w = tf.where(found, ws[first], fb_w)
    top = tf.where(found, tf.random.stateless_uniform([], i_seed, 0, height - h + 1, dtype=tf.int32),
                   (height - h) // 2)
    left = tf.where(found, tf.random.stateless_uniform([], j_seed, 0, width - w + 1, dtype=tf.int32),
                    (width - w) // 2)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
    out = resize(crop, size, "exact")
    out.set_shape([size, size, image.shape[-1]])
    return out


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 0.5."""
    flip = tf.random.stateless_uniform([], _as_seed(seed)) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: tf.identity(image))


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """0..255 pixels -> float32 (x / 255 - mean) / std, mean and std per channel in [0, 1] pixel units."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def mean_std(name_or_values) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a NORMALIZATION preset name, or a given (mean, std) pair checked to be 3 floats each."""
    if isinstance(name_or_values, str):
        if name_or_values not in NORMALIZATION:
            raise ValueError(f"unknown normalization {name_or_values!r}; known: {', '.join(sorted(NORMALIZATION))}")
        return NORMALIZATION[name_or_values]
    mean, std = name_or_values
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"expected 3 means and 3 positive stds, got mean={mean} std={std}")
    return mean, std


# ----------------------------------------------------------------------------------------------- RandAugment
#
# Each op maps (uint8 [H, W, 3], magnitude float64 scalar in 0..10, sign float64 scalar +-1) -> uint8 [H, W, 3].
# The pixel ops reproduce Pillow's arithmetic (what timm / ViLT run), so they can be tested against it exactly;
# the geometric ops use Pillow's conventions (angle, shear and translation sign, shear about the top-left corner)
# with bilinear sampling, filling with grey.


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    # PIL.Image.blend: float32 interpolation / extrapolation, clipped, truncated (not rounded) to uint8.
    degenerate = tf.cast(degenerate, tf.float32)
    out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    # PIL's RGB -> L in 16-bit fixed point, rounded: ITU-R 601-2 luma.
    rgb = tf.cast(image, tf.int32)
    luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.bitwise.right_shift(luma, 16)[..., None]  # int32 [H, W, 1]


def _enhance_factor(magnitude: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    # In float64, then float32 as Pillow's C blend receives Python's float: bit-equal factors, bit-equal blends.
    return tf.cast(1.0 + sign * magnitude * 0.09, tf.float32)  # 0.1 .. 1.9 at magnitude 10


def _identity(image, magnitude, sign):
    del magnitude, sign
    return tf.identity(image)


def _auto_contrast(image, magnitude, sign):
    del magnitude, sign
    # PIL.ImageOps.autocontrast (cutoff 0): per channel, a LUT int(i * scale + offset) stretching [lo, hi] to
    # [0, 255], computed in float64 as Python does so that truncation agrees with Pillow at every level.
    x = tf.cast(image, tf.int32)
    lo = tf.cast(tf.reduce_min(x, axis=[0, 1]), tf.float64)
    hi = tf.cast(tf.reduce_max(x, axis=[0, 1]), tf.float64)
    stretch = hi > lo
    scale = 255.0 / tf.where(stretch, hi - lo, 1.0)
    offset = -lo * scale
    levels = tf.range(256, dtype=tf.float64)[:, None]
    lut = tf.clip_by_value(tf.cast(levels * scale + offset, tf.int32), 0, 255)  # cast truncates like int()
    lut = tf.where(stretch, lut, tf.cast(levels, tf.int32))  # [256, 3]
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), x * 3 + tf.range(3)), tf.uint8)


def _equalize(image, magnitude, sign):
    del magnitude, sign
    # PIL.ImageOps.equalize, integer for integer: per channel, step = (pixels - count of the top level) // 255 and
    # lut[i] = (step // 2 + pixels below level i) // step; a channel with step 0 is left as is.
    x = tf.cast(image, tf.int32)
    channels = tf.reshape(tf.transpose(x, [2, 0, 1]), [3, -1])
    histo = tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1, dtype=tf.int32)  # [3, 256]
    total = tf.shape(channels)[1]
    top = tf.gather(histo, tf.reduce_max(channels, axis=1), batch_dims=1)
    step = (total - top) // 255  # [3]
    safe_step = tf.maximum(step, 1)
    below = tf.cumsum(histo, axis=1, exclusive=True)
    lut = tf.clip_by_value((safe_step[:, None] // 2 + below) // safe_step[:, None], 0, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])  # [3, 256]
    return tf.cast(tf.gather(tf.reshape(tf.transpose(lut), [-1]), x * 3 + tf.range(3)), tf.uint8)


def _solarize(image, magnitude, sign):
    del sign
    # PIL.ImageOps.solarize: levels >= threshold are inverted; threshold 256 (identity) .. 0 (all inverted).
    threshold = 256.0 - magnitude * 25.6
    return tf.where(tf.cast(image, tf.float64) < threshold, image, 255 - image)


def _posterize(image, magnitude, sign):
    del sign
    # PIL.ImageOps.posterize: keep the top `bits` bits, bits = 8 - round(0.4 m): 8 (identity) .. 4 at m = 10.
    bits = tf.clip_by_value(8.0 - tf.round(magnitude * 0.4), 1.0, 8.0)
    shift = tf.cast(8.0 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _color(image, magnitude, sign):
    # PIL.ImageEnhance.Color: blend with the image's grey version.
    grey = tf.broadcast_to(_grayscale(image), tf.shape(image))
    return _blend(grey, image, _enhance_factor(magnitude, sign))


def _contrast(image, magnitude, sign):
    # PIL.ImageEnhance.Contrast: blend with a flat image at the grey version's mean, rounded.
    mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float64))
    flat = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.float32))
    return _blend(flat, image, _enhance_factor(magnitude, sign))


def _brightness(image, magnitude, sign):
    # PIL.ImageEnhance.Brightness: blend with black.
    return _blend(tf.zeros_like(image), image, _enhance_factor(magnitude, sign))


def _sharpness(image, magnitude, sign):
    # PIL.ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, / 13), which
    # leaves the one-pixel border unfiltered.
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(interior, smooth, x)
    return _blend(degenerate, image, _enhance_factor(magnitude, sign))


def _affine(image: tf.Tensor, transform: Sequence[tf.Tensor]) -> tf.Tensor:
    """Bilinear resampling of uint8 [H, W, 3]: output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2)
    for transform = (a0, a1, a2, b0, b1, b2) in pixel-index coordinates; outside pixels read grey."""
    matrix = tf.cast(tf.stack(list(transform) + [0.0, 0.0])[None], tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=matrix, output_shape=tf.shape(image)[:2],
        fill_value=_FILL, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return _to_uint8(out)


def _rotate(image, magnitude, sign):
    # Counter-clockwise by sign * 3m degrees (30 at m = 10) about the image centre, like PIL's Image.rotate.
    theta = tf.cast(sign * magnitude * (30.0 / _MAX_MAGNITUDE) * (math.pi / 180.0), tf.float32)
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    return _affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def _shear_x(image, magnitude, sign):
    # PIL transform AFFINE (1, s, 0, 0, 1, 0), s = sign * 0.03m (0.3 at m = 10): about the top-left corner of
    # the top-left pixel, which is +s/2 in pixel-index coordinates.
    s = tf.cast(sign * magnitude * 0.03, tf.float32)
    return _affine(image, [1.0, s, s / 2.0, 0.0, 1.0, 0.0])


def _shear_y(image, magnitude, sign):
    s = tf.cast(sign * magnitude * 0.03, tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, s, 1.0, s / 2.0])


def _translate_x(image, magnitude, sign):
    # PIL transform AFFINE (1, 0, t, 0, 1, 0), t = sign * 0.045m * width: relative (timm's TranslateXRel), so the
    # op means the same on 64 px and 384 px images (ViLT's absolute 100 px would empty a 64 px image); a positive
    # t moves the content left.
    t = tf.cast(sign * magnitude * 0.045, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [1.0, 0.0, t, 0.0, 1.0, 0.0])


def _translate_y(image, magnitude, sign):
    t = tf.cast(sign * magnitude * 0.045, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, t])


_OPS: dict[str, Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "Identity": _identity, "AutoContrast": _auto_contrast, "Equalize": _equalize, "Rotate": _rotate,
    "Solarize": _solarize, "Color": _color, "Posterize": _posterize, "Contrast": _contrast,
    "Brightness": _brightness, "Sharpness": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateX": _translate_x, "TranslateY": _translate_y,
}
assert tuple(_OPS) == RANDAUGMENT_OPS


def _check_uint8(image: tf.Tensor, what: str) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"{what} takes a uint8 [H, W, 3] image, got {image.dtype.name}")
    return image


def apply_op(image: tf.Tensor, name: str, magnitude: float) -> tf.Tensor:
    """One RandAugment op (a name from RANDAUGMENT_OPS) at `magnitude` (0..10) with positive sign, uint8 in/out."""
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")
    image = _check_uint8(image, "apply_op")
    out = _OPS[name](image, tf.constant(magnitude, tf.float64), tf.constant(1.0, tf.float64))
    out.set_shape(image.shape)
    return out


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2, magnitude: float = 9.0) -> tf.Tensor:
    """RandAugment: `num_layers` times, an op drawn uniformly from RANDAUGMENT_OPS at `magnitude` (0..10), with a
    random sign for the signed ones (Rotate, Shear*, Translate*, Color, Contrast, Brightness, Sharpness).

    Magnitude ranges at m (10 = the maximum): rotate 3m degrees; shear 0.03m; translate 0.045m of the image side;
    solarize threshold 256 - 25.6m; posterize to 8 - round(0.4m) bits (8..4, so never below 1); enhance factors
    1 +- 0.09m (0.1..1.9). uint8 [H, W, 3] in and out.
    """
    image = _check_uint8(image, "rand_augment")
    shape = image.shape
    m = tf.constant(magnitude, tf.float64)
    seeds = tf.random.experimental.stateless_split(_as_seed(seed), num_layers) if num_layers else []
    for layer in range(num_layers):
        op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[layer], 2))
        index = tf.random.stateless_uniform([], op_seed, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        sign = tf.cast(sign, tf.float64)
        branches = [functools.partial(_OPS[name], image, m, sign) for name in RANDAUGMENT_OPS]
        image = tf.switch_case(index, branches)
        image.set_shape(shape)
    return image


# ----------------------------------------------------------------------------------------------- composition


def default_image_config() -> ml_collections.ConfigDict:
    """Image preprocessing config with its defaults: an exact resize, no augmentation."""
    return ml_collections.ConfigDict(dict(
        resize="exact",               # "exact": squash to size x size; "shorter": shorter side to size, then crop
        random_resized_crop=False,    # train only; replaces the resize
        crop_scale=(0.08, 1.0),       # area fraction range of random_resized_crop
        flip=False,                   # train only
        randaugment=dict(num_layers=0, magnitude=9.0),  # train only; num_layers=0 disables
    ))


def _resolve_config(cfg) -> ml_collections.ConfigDict:
    resolved = default_image_config()
    given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    # A misspelt field is an error, not a silently ignored option.
    unknown = sorted(set(given) - set(resolved.keys()))
    unknown += sorted(f"randaugment.{k}" for k in set(given.get("randaugment") or {}) - set(resolved.randaugment))
    if unknown:
        raise ValueError(f"unknown image preprocessing field(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(resolved.keys())}, randaugment.num_layers, randaugment.magnitude")
    resolved.update(given)
    if resolved.resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resolved.resize!r}; valid: {', '.join(RESIZE_MODES)}")
    return resolved


def is_deterministic(cfg, *, train: bool) -> bool:
    """Whether `image_preprocess_fn(cfg, train=train, ...)` ignores its seed (no random crop, flip or RandAugment)."""
    cfg = _resolve_config(cfg)
    return not (train and (cfg.random_resized_crop or cfg.flip or cfg.randaugment.num_layers))


def image_preprocess_fn(cfg, *, train: bool, image_size: int, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """fn(encoded bytes or uint8 [H, W, 3], seed [2]) -> float32 [image_size, image_size, 3], normalised with
    (mean, std) when given, else in 0..255.

    Train: random_resized_crop (or the resize) -> flip -> RandAugment (at the final size, as timm and big_vision
    do; the image is rounded to uint8 first) -> normalize. Eval: the resize ("shorter" then center-crops) ->
    normalize; eval ignores the seed. Train with "shorter" and no random_resized_crop center-crops as well. An
    image already image_size x image_size is not resized.
    """
    cfg = _resolve_config(cfg)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    crop = train and cfg.random_resized_crop
    flip = train and cfg.flip
    ra_layers = cfg.randaugment.num_layers if train else 0
    crop_scale = tuple(cfg.crop_scale)

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        image = tf.convert_to_tensor(image)
        if image.dtype == tf.string:
            image = decode_image(image)
        elif image.dtype != tf.uint8:
            raise TypeError(f"expected encoded image bytes or a uint8 image, got {image.dtype.name}")
        # One sub-seed per op, so switching one augmentation on or off leaves the others' draws unchanged.
        crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), 3))
        if crop:
            x = random_resized_crop(image, image_size, crop_seed, scale=crop_scale)
        elif image.shape[0] == image_size and image.shape[1] == image_size:
            x = tf.cast(image, tf.float32)  # already the size: a resize would only blur it
        elif cfg.resize == "shorter":
            x = center_crop(resize(image, image_size, "shorter"), image_size)
        else:
            x = resize(image, image_size, "exact")
        if flip:
            x = random_flip(x, flip_seed)
        if ra_layers:
            x = rand_augment(_to_uint8(x), ra_seed, ra_layers, cfg.randaugment.magnitude)
        out = normalize(x, *mean_std((mean, std))) if mean is not None else tf.cast(x, tf.float32)
        return tf.ensure_shape(out, [image_size, image_size, 3])

    return fn


def resize_pad_fn(cfg, *, train: bool, image_size: int, canvas: int,
                  size_divisor: int = 32) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """fn(encoded bytes or uint8 [H, W, 3], seed [2]) -> (float32 [canvas, canvas, 3] in 0..255, int32 pixel mask
    [canvas, canvas]): ViLT's fine-tuning input (transformers' ViltImageProcessor).

    The image is resized (bilinear, antialiased) so its shorter side is image_size, scaled down further if its
    longer side would exceed canvas (ViLT: 384 and 640), each side floored to a multiple of size_divisor; train
    flips and RandAugment apply as in `image_preprocess_fn`; it is then placed top-left on a zero canvas, the mask
    1 on its pixels. random_resized_crop is not supported here (the aspect ratio is the point).
    """
    cfg = _resolve_config(cfg)
    if cfg.random_resized_crop:
        raise ValueError("random_resized_crop cannot be combined with padded images (data.image_canvas)")
    if canvas < image_size:
        raise ValueError(f"data.image_canvas={canvas} must be at least data.image_size={image_size}")
    flip = train and cfg.flip
    ra_layers = cfg.randaugment.num_layers if train else 0

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.convert_to_tensor(image)
        if image.dtype == tf.string:
            image = decode_image(image)
        _, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), 3))
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.minimum(image_size / tf.reduce_min(shape), canvas / tf.reduce_max(shape))
        # As ViltImageProcessor: round the scaled sides, then down to a multiple of the divisor.
        size = tf.cast(tf.floor(tf.floor(shape * scale + 0.5) / size_divisor) * size_divisor, tf.int32)
        size = tf.maximum(size, size_divisor)
        x = tf.image.resize(image, size, method="bilinear", antialias=True)
        if flip:
            x = random_flip(x, flip_seed)
        if ra_layers:
            x = tf.cast(rand_augment(_to_uint8(x), ra_seed, ra_layers, cfg.randaugment.magnitude), tf.float32)
        x = tf.image.pad_to_bounding_box(x, 0, 0, canvas, canvas)
        mask = tf.image.pad_to_bounding_box(tf.ones([size[0], size[1], 1], tf.int32), 0, 0, canvas, canvas)[..., 0]
        return tf.ensure_shape(x, [canvas, canvas, 3]), tf.ensure_shape(mask, [canvas, canvas])

    return fn


# ----------------------------------------------------------------------------------------------- text


def clean_text(text: tf.Tensor, lowercase: bool = False) -> tf.Tensor:
    """Caption cleanup on a string tensor of any shape: invalid UTF-8 -> U+FFFD, control characters (Unicode Cc)
    and runs of whitespace / separators (Unicode Z, tabs, newlines, no-break and ideographic spaces) -> one space,
    stripped; lowercase (Unicode-aware) on request.

    Not done: NFKC normalisation. TF 2.21 has no Unicode normalisation op (`tf.strings.unicode_normalize` does not
    exist and `tensorflow_text`'s normalize_utf8 is not installed), so compatibility forms (full-width letters,
    ligatures, superscripts) pass through unchanged; the WordPiece tokenizer on the host may normalise them.
    """
    text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
    text = tf.strings.regex_replace(text, r"[\p{Cc}\p{Z}]+", " ")
    text = tf.strings.strip(text)
    if lowercase:
        text = tf.strings.lower(text, encoding="utf-8")
    return text
