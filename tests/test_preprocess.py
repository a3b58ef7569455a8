"""Tests of the tf.data preprocessing ops: NumPy / Pillow references, stateless determinism, graph mode."""
from __future__ import annotations

import io

import chex
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mmjax.data import preprocess as pp

GREY = (128, 128, 128)


def _seed(*values) -> tf.Tensor:
    return tf.constant(values if len(values) == 2 else (values[0], 0), tf.int64)


def _smooth_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Gradients + noise: every level distinct enough for the LUT ops, smooth enough for resampling."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 3 + 20, yy * 4 + 10, (xx + yy) * 2 + 30], -1) + rng.integers(0, 40, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _noise_image(h: int = 48, w: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _coordinate_image(h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3]: channel 0 = row, channel 1 = column, channel 2 = 0."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([yy, xx, np.zeros_like(yy)], -1)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- normalisation


def test_normalize_matches_numpy():
    image = _noise_image()
    for name in ("half", "clip", "imagenet"):
        mean, std = pp.mean_std(name)
        out = pp.normalize(tf.constant(image), mean, std).numpy()
        expected = (image.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)  # float32 arithmetic vs float64


def test_normalization_presets_and_errors():
    assert pp.NORMALIZATION["half"] == ((0.5,) * 3, (0.5,) * 3)
    assert pp.NORMALIZATION["clip"] == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert pp.NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert pp.mean_std("clip") == pp.NORMALIZATION["clip"]
    assert pp.mean_std(([0.1, 0.2, 0.3], [1, 2, 3])) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="known: clip, half, imagenet"):
        pp.mean_std("openai")
    with pytest.raises(ValueError, match="3 means"):
        pp.mean_std(((0.5, 0.5), (0.5, 0.5)))


# ----------------------------------------------------------------------------------------------- resize / crops


def test_resize_shapes_aspect_and_range():
    image = tf.constant(_noise_image(30, 50))
    exact = pp.resize(image, 16)
    assert exact.shape == (16, 16, 3) and exact.dtype == tf.float32
    # Bilinear with antialiasing is a convex combination: no overshoot outside the input's range.
    assert float(tf.reduce_min(exact)) >= 0.0 and float(tf.reduce_max(exact)) <= 255.0
    assert pp.resize(image, 20, "shorter").shape == (20, 33, 3)  # 50 * 20 / 30 = 33.3 -> 33
    assert pp.resize(tf.transpose(image, [1, 0, 2]), 20, "shorter").shape == (33, 20, 3)
    assert pp.resize(image, 30, "shorter").shape == (30, 50, 3)
    # Same size: the identity (to float rounding).
    np.testing.assert_allclose(pp.resize(image, 30, "shorter").numpy(), image.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="valid: exact, shorter"):
        pp.resize(image, 16, "longer")


def test_resize_matches_pil():
    image = _smooth_image(48, 64)
    ours = pp.resize(tf.constant(image), 24).numpy()
    ref = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR)).astype(np.float64)
    # Both are antialiased triangle filters; Pillow rounds to uint8 and differs at the borders by < 2 levels.
    assert np.abs(ours - ref).max() <= 2.0, np.abs(ours - ref).max()
    assert np.abs(ours - ref).mean() <= 0.6, np.abs(ours - ref).mean()


def test_center_crop_is_the_central_slice():
    image = _noise_image(41, 60)
    np.testing.assert_array_equal(pp.center_crop(tf.constant(image), 32).numpy(), image[4:36, 14:46])
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        pp.center_crop(tf.constant(image), 48)  # larger than the image


def test_random_flip():
    image = tf.constant(_noise_image(8, 12))
    seen = set()
    for s in range(32):
        out = pp.random_flip(image, _seed(s)).numpy()
        np.testing.assert_array_equal(out, pp.random_flip(image, _seed(s)).numpy())  # pure function of the seed
        if np.array_equal(out, image.numpy()):
            seen.add("kept")
        else:
            np.testing.assert_array_equal(out, image.numpy()[:, ::-1])
            seen.add("flipped")
    assert seen == {"kept", "flipped"}  # P(one outcome in 32 fair draws) = 2^-31


def test_random_resized_crop_deterministic_and_varied():
    image = tf.constant(_noise_image(40, 56))
    a = pp.random_resized_crop(image, 24, _seed(3))
    assert a.shape == (24, 24, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a.numpy(), pp.random_resized_crop(image, 24, _seed(3)).numpy())
    np.testing.assert_array_equal(  # int32 seeds work and mean the same
        a.numpy(), pp.random_resized_crop(image, 24, tf.constant([3, 0], tf.int32)).numpy())
    outs = {pp.random_resized_crop(image, 24, _seed(s)).numpy().tobytes() for s in range(8)}
    assert len(outs) == 8


def test_random_resized_crop_geometry():
    h, w, size = 96, 128, 32
    image = tf.constant(_coordinate_image(h, w))
    for s in range(24):
        out = pp.random_resized_crop(image, size, _seed(s)).numpy()
        rows, cols = out[..., 0], out[..., 1]
        assert rows.min() >= 0 and rows.max() <= h - 1 and cols.min() >= 0 and cols.max() <= w - 1
        # The output's first / last pixel centres sit half an output pixel inside the crop: recover its extent.
        ch = (rows[-1, 0] - rows[0, 0]) * size / (size - 1)
        cw = (cols[0, -1] - cols[0, 0]) * size / (size - 1)
        area, aspect = ch * cw / (h * w), cw / ch
        # Tolerances: the crop's sides are rounded to whole pixels and antialiasing shifts the border samples.
        assert 0.08 * 0.85 <= area <= 1.0 + 1e-3, (s, area)
        assert 0.75 * 0.9 <= aspect <= 4 / 3 * 1.1, (s, aspect)


def test_random_resized_crop_fallback_and_full_crop():
    # Too wide for any crop of aspect <= 4/3 at >= 90% of the area: torchvision's fallback, the central 8 x 11.
    out = pp.random_resized_crop(tf.constant(_coordinate_image(8, 200)), 16, _seed(0), scale=(0.9, 1.0)).numpy()
    left = (200 - 11) // 2
    assert out[..., 0].min() >= 0 and out[..., 0].max() <= 7
    assert left <= out[..., 1].min() <= left + 1 and left + 9 <= out[..., 1].max() <= left + 10, out[..., 1]
    # scale (1, 1) and ratio (1, 1) on a square image: the whole image, i.e. the exact resize.
    image = tf.constant(_noise_image(40, 40))
    full = pp.random_resized_crop(image, 24, _seed(5), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(full.numpy(), pp.resize(image, 24).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------------- RandAugment


def test_randaugment_pool():
    assert "Invert" not in pp.RANDAUGMENT_OPS and "Cutout" not in pp.RANDAUGMENT_OPS
    assert set(pp.RANDAUGMENT_OPS) == {
        "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize", "Contrast",
        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    with pytest.raises(ValueError, match="known: Identity"):
        pp.apply_op(tf.zeros([4, 4, 3], tf.uint8), "Invert", 5.0)
    with pytest.raises(TypeError, match="uint8"):
        pp.apply_op(tf.zeros([4, 4, 3], tf.float32), "Identity", 5.0)


def _pil_reference(name: str, pil: Image.Image, m: float) -> Image.Image:
    factor = 1.0 + 0.09 * m
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Solarize": lambda: ImageOps.solarize(pil, int(np.ceil(256 - m * 25.6))),  # integer levels < 256 - 25.6m
        "Posterize": lambda: ImageOps.posterize(pil, 8 - round(0.4 * m)),
        "Color": lambda: ImageEnhance.Color(pil).enhance(factor),
        "Contrast": lambda: ImageEnhance.Contrast(pil).enhance(factor),
        "Brightness": lambda: ImageEnhance.Brightness(pil).enhance(factor),
        "Sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(factor),
    }[name]()


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Solarize", "Posterize", "Color", "Contrast",
                                  "Brightness", "Sharpness"])
def test_pixel_ops_match_pillow_exactly(name):
    # These reproduce Pillow's integer / float32 arithmetic, so the tolerance is 0 levels.
    for image in (_smooth_image(), _noise_image()):
        for m in (0.0, 3.0, 5.0, 9.0, 10.0):
            ours = pp.apply_op(tf.constant(image), name, m).numpy()
            assert ours.dtype == np.uint8 and ours.shape == image.shape
            np.testing.assert_array_equal(ours, np.asarray(_pil_reference(name, Image.fromarray(image), m)),
                                          err_msg=f"{name} at magnitude {m}")


def test_equalize_and_autocontrast_on_flat_channels():
    # A constant channel has no histogram to stretch: Pillow leaves it as is, and so must we (no division by 0).
    image = _smooth_image()
    image[..., 1] = 77
    for name in ("Equalize", "AutoContrast"):
        np.testing.assert_array_equal(pp.apply_op(tf.constant(image), name, 9.0).numpy(),
                                      np.asarray(_pil_reference(name, Image.fromarray(image), 9.0)))


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"])
def test_geometric_ops_match_pillow(name):
    image = _smooth_image(48, 64)
    pil, m = Image.fromarray(image), 5.0
    s, t = 0.03 * m, 0.045 * m
    ref = {
        "Rotate": lambda: pil.rotate(3 * m, Image.BILINEAR, fillcolor=GREY),
        "ShearX": lambda: pil.transform(pil.size, Image.AFFINE, (1, s, 0, 0, 1, 0), Image.BILINEAR, fillcolor=GREY),
        "ShearY": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, s, 1, 0), Image.BILINEAR, fillcolor=GREY),
        "TranslateX": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, t * 64, 0, 1, 0), Image.BILINEAR,
                                            fillcolor=GREY),
        "TranslateY": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, t * 48), Image.BILINEAR,
                                            fillcolor=GREY),
    }[name]()
    ours = pp.apply_op(tf.constant(image), name, m).numpy().astype(int)
    ref = np.asarray(ref).astype(int)
    # Away from the borders (all samples inside the image at m = 5) only bilinear rounding differs: <= 1 level.
    # At the borders TF blends the grey fill into the edge samples where Pillow clamps: a few pixels differ a lot.
    assert np.abs(ours - ref)[12:36, 12:32].max() <= 1, np.abs(ours - ref)[12:36, 12:32].max()
    assert np.abs(ours - ref).mean() <= 1.5, np.abs(ours - ref).mean()


def test_geometric_ops_move_a_pixel():
    image = np.zeros((40, 40, 3), np.uint8)
    image[20, 24] = 255
    x = tf.constant(image)
    # Translation by 0.045 * 5 * 40 = 9 px: Pillow's convention, positive moves the content left / up.
    for name, expected in (("TranslateX", (20, 15)), ("TranslateY", (11, 24))):
        out = pp.apply_op(x, name, 5.0).numpy()
        assert out[expected].tolist() == [255] * 3, name
        assert (out[..., 0] >= 128).sum() > 1  # grey fill came in from the right / bottom
    # The bright pixel's contribution: the op on the image minus the op on the black image (edges blend in grey).
    def moved(name, m):
        return (pp.apply_op(x, name, m).numpy()[..., 0].astype(float)
                - pp.apply_op(tf.zeros_like(x), name, m).numpy()[..., 0].astype(float))

    def centroid(values):
        rows, cols = np.mgrid[0:values.shape[0], 0:values.shape[1]]
        return (rows * values).sum() / values.sum(), (cols * values).sum() / values.sum()

    # ShearX (1, 0.3, 0) reads column x + 0.3 (y + 0.5) - 0.5 + 0.5 = x + 6.15 on row 20: column 24 -> 17.85.
    np.testing.assert_allclose(centroid(moved("ShearX", 10.0)), (20, 17.85), atol=0.05)  # bilinear rounding
    np.testing.assert_allclose(centroid(moved("ShearY", 10.0)), (20 - 7.35, 24), atol=0.05)  # 0.3 * 24.5
    # Rotate by +30 degrees is counter-clockwise about (19.5, 19.5): (row 20, col 24) -> (17.68, 23.65).
    np.testing.assert_allclose(centroid(moved("Rotate", 10.0)), (17.68, 23.65), atol=0.05)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Identity"):
        np.testing.assert_array_equal(pp.apply_op(x, name, 0.0).numpy(), image)  # magnitude 0: identity


def test_rand_augment_deterministic_and_from_the_pool():
    image = _smooth_image(32, 32)
    x = tf.constant(image)
    out = pp.rand_augment(x, _seed(1), num_layers=2, magnitude=9.0)
    assert out.dtype == tf.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), pp.rand_augment(x, _seed(1), 2, 9.0).numpy())
    np.testing.assert_array_equal(pp.rand_augment(x, _seed(1), 0, 9.0).numpy(), image)  # 0 layers: identity

    # One layer = exactly one pool op with either sign: name every output.
    m = tf.constant(9.0, tf.float64)
    candidates = {}
    for name in pp.RANDAUGMENT_OPS:
        for sign in (1.0, -1.0):
            candidates.setdefault(pp._OPS[name](x, m, tf.constant(sign, tf.float64)).numpy().tobytes(), name)
    used = set()
    for s in range(40):
        got = pp.rand_augment(x, _seed(s, 7), num_layers=1, magnitude=9.0).numpy()
        assert got.tobytes() in candidates, f"seed {s}: not one pool op"
        assert not np.array_equal(got, 255 - image)  # no Invert
        used.add(candidates[got.tobytes()])
    assert len(used) >= 8, used  # 40 uniform draws of 14 ops: ~13 distinct expected


# ----------------------------------------------------------------------------------------------- text


def test_clean_text():
    assert pp.clean_text(tf.constant("  A\tred\n\ncircle  ")).numpy() == b"A red circle"
    assert pp.clean_text(tf.constant("  A\tRED  Circle"), lowercase=True).numpy() == b"a red circle"
    assert pp.clean_text(tf.constant("a\x00b\x07c\x1bd\x7f")).numpy() == b"a b c d"  # control chars -> space
    # Unicode whitespace (no-break, ideographic, line separator) and Unicode-aware lowercase.
    assert pp.clean_text(tf.constant("ÉCOLE\u00a0\u3000x\u2028y"), lowercase=True).numpy().decode() == "école x y"
    assert pp.clean_text(tf.constant(b"ok \xff")).numpy().decode() == "ok \ufffd"  # invalid UTF-8 replaced
    out = pp.clean_text(tf.constant([" a  b ", "\t", "C"]), lowercase=True)
    assert out.shape == (3,) and out.numpy().tolist() == [b"a b", b"", b"c"]


# ----------------------------------------------------------------------------------------------- composition


def _cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = pp.default_image_config()
    cfg.update(overrides)
    return cfg


def test_default_image_config():
    cfg = pp.default_image_config()
    assert cfg.resize == "exact" and not cfg.random_resized_crop and not cfg.flip
    assert tuple(cfg.crop_scale) == (0.08, 1.0)
    assert cfg.randaugment.num_layers == 0 and cfg.randaugment.magnitude == 9.0


CONFIGS = {
    "exact": dict(),
    "shorter": dict(resize="shorter"),
    "crop": dict(random_resized_crop=True, crop_scale=(0.5, 1.0)),
    "flip": dict(flip=True),
    "randaugment": dict(randaugment=dict(num_layers=2, magnitude=9.0)),
    "all": dict(resize="shorter", random_resized_crop=True, flip=True, randaugment=dict(num_layers=2, magnitude=9.0)),
}


@pytest.mark.parametrize("train", [True, False])
def test_image_preprocess_fn_in_tf_data(train):
    # All configs through Dataset.map (graph mode), from both png bytes and uint8 images.
    image = _smooth_image(40, 56)
    ds = tf.data.Dataset.from_tensors((tf.constant(_png(image)), tf.constant(image), _seed(4)))
    for name, overrides in CONFIGS.items():
        fn = pp.image_preprocess_fn(_cfg(**overrides), train=train, image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
        mapped = ds.map(lambda png, raw, seed: (fn(png, seed), fn(raw, seed)))  # pylint: disable=cell-var-from-loop
        assert mapped.element_spec[0].shape == (24, 24, 3), name  # static
        from_png, from_raw = next(iter(mapped.as_numpy_iterator()))
        chex.assert_shape([from_png, from_raw], (24, 24, 3))
        assert from_png.dtype == np.float32 and np.isfinite(from_png).all()
        assert -1.0 <= from_png.min() and from_png.max() <= 1.0, name  # "half" normalisation of 0..255
        np.testing.assert_array_equal(from_png, from_raw, err_msg=name)  # png is lossless: same pixels, same seed


def test_image_preprocess_fn_train_determinism():
    image = tf.constant(_smooth_image(40, 56))
    fn = tf.function(pp.image_preprocess_fn(_cfg(**CONFIGS["all"]), train=True, image_size=24, mean=(0.5,) * 3,
                                            std=(0.5,) * 3))
    a = fn(image, _seed(11)).numpy()
    np.testing.assert_array_equal(a, fn(image, _seed(11)).numpy())
    np.testing.assert_array_equal(a, fn(image, tf.constant([11, 0], tf.int32)).numpy())  # either seed dtype
    outs = {fn(image, _seed(s)).numpy().tobytes() for s in range(6)}
    assert len(outs) == 6


def test_image_preprocess_fn_eval_matches_direct():
    image = _smooth_image(40, 56)
    mean, std = pp.mean_std("clip")
    direct_exact = tf.image.resize(image, [24, 24], antialias=True).numpy()
    direct_shorter = tf.image.resize(image, [24, 34], antialias=True).numpy()[:, 5:29]  # 56 * 24 / 40 = 33.6 -> 34
    for resize_mode, direct in (("exact", direct_exact), ("shorter", direct_shorter)):
        # Train-only options must not act in eval, and eval ignores the seed.
        cfg = _cfg(resize=resize_mode, random_resized_crop=True, flip=True, randaugment=dict(num_layers=2))
        fn = pp.image_preprocess_fn(cfg, train=False, image_size=24, mean=mean, std=std)
        expected = (direct / 255.0 - np.array(mean)) / np.array(std)
        for seed in (0, 1):
            out = fn(tf.constant(_png(image)), _seed(seed)).numpy()
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5, err_msg=resize_mode)  # float32 rounding


def test_image_preprocess_fn_config_errors():
    with pytest.raises(ValueError, match="valid: exact, shorter"):
        pp.image_preprocess_fn(_cfg(resize="longest"), train=False, image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    bad = _cfg()
    bad.random_resize_crop = True  # misspelt
    with pytest.raises(ValueError, match="random_resized_crop"):
        pp.image_preprocess_fn(bad, train=True, image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    fn = pp.image_preprocess_fn(_cfg(), train=False, image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(TypeError, match="uint8"):
        fn(tf.zeros([24, 24, 3], tf.float32), _seed(0))
