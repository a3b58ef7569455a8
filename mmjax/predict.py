"""Use a trained model: rank a folder of images against a text, rank texts for an image, or score every pair.

    python -m mmjax.predict --workdir=/tmp/clip --images=DIR --text="a red circle"          # which images match
    python -m mmjax.predict --workdir=/tmp/clip --image=DIR/0004_red_circle.png --texts="a red circle,a blue rectangle"
    python -m mmjax.predict --workdir=/tmp/clip --images=DIR --texts_file=DIR/classes.txt   # best text per image
    python -m mmjax.predict --workdir=/tmp/vilt --images=DIR --text="a green triangle"      # ITM match probability
    python -m mmjax.predict --model=CONVERTED_DIR --images=DIR --text="a dog" --out=OUT      # `mmjax.convert` output
    python -m mmjax.predict --export_images=/tmp/shapes --count=24        # sample images of the embedded data

Models: dual encoders (CLIP, SigLIP, LiT, DeViSE, CoCa's contrastive towers: `clip`, `coca`, and an image-text
`dual_encoder`) score a pair by the cosine similarity of their embeddings (`encode_image` / `encode_text`); the
probability is the softmax over the candidates at the model's logit scale (SigLIP: the pair's sigmoid; the ranking
losses of DeViSE / VSE have no calibrated scale: none). Single-stream matching models (`vilt`, `fusion`) score a
pair by their ITM head's match probability. Region models (UNITER, ViLBERT, LXMERT, VisualBERT, OSCAR) need region
features and captioners score no pairs: both are refused in one line.

Weights: --workdir (a training run: config.json, tokenizer.json, latest checkpoint or --step; images are
preprocessed exactly as the run's evaluation did) or --model (a directory written by `python -m mmjax.convert
--hf=... --out=DIR`, or a Hugging Face directory; its tokenizer.json / vocab.txt or --tokenizer; the image size is
the model's and the normalisation DIR/preprocessor_config.json's, else CLIP's for CLIP and 0.5/0.5 otherwise, or
--normalization). Images: every .png / .jpg / .jpeg / .gif / .bmp / .webp under --images (recursively, sorted).

Prints a table (rank, score, probability, image or text) of the --top best, then writes into --out (default
WORKDIR/predictions/; required with --model) predictions.json (every score), contact_sheet.html (self-contained:
thumbnails embedded as base64) and contact_sheet.png, and prints their paths last. Input errors are one line,
`error: ...`, with exit status 2.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags, logging

from mmjax import cli, cli_logging

IMAGE_SUFFIXES = cli.IMAGE_SUFFIXES
DUAL_ENCODER, MATCHING = "dual_encoder", "matching"
REGION_MODELS = ("uniter", "vilbert", "lxmert", "visualbert", "oscar")
MODES = ("rank_images", "rank_texts", "matrix")
THUMBNAIL = 192  # longest side of a contact-sheet thumbnail, in pixels


def define_flags() -> None:
    """This program's flags (defined when it runs, so importing it defines nothing)."""
    flags.DEFINE_string("workdir", None, "A training run (config.json, tokenizer.json, checkpoints).")
    flags.DEFINE_string("model", None, "Instead of --workdir: an mmjax.convert output or a Hugging Face directory.")
    flags.DEFINE_string("tokenizer", None, "tokenizer.json / vocab.txt (default: the run's, or --model's own).")
    flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
    flags.DEFINE_string("normalization", None, "Image normalisation preset (half | clip | imagenet); default: the "
                        "run's (--workdir) or the model directory's.")
    flags.DEFINE_string("images", None, "A folder of images (recursive).")
    flags.DEFINE_string("image", None, "One image file (rank --texts for it).")
    flags.DEFINE_string("text", None, "One text query (rank the --images folder against it).")
    flags.DEFINE_list("texts", None, "Comma-separated candidate texts.")
    flags.DEFINE_string("texts_file", None, "Candidate texts, one per line.")
    flags.DEFINE_integer("top", 10, "Rows shown in the table and on the contact sheet.")
    flags.DEFINE_integer("batch_size", 64, "Images (or image-text pairs) per forward pass.")
    flags.DEFINE_string("out", None, "Output folder (default WORKDIR/predictions; required with --model).")
    flags.DEFINE_string("export_images", None, "Write --count test images of the embedded dataset into this folder "
                        "(named by their colour and shape, with classes.txt) and exit.")
    flags.DEFINE_integer("count", 16, "Images written by --export_images.")


# ----------------------------------------------------------------------------------------------- inputs


def read_texts(text: str | None, texts: Sequence[str] | None, texts_file: str | None) -> list[str]:
    """The candidate texts of --text, --texts or --texts_file (exactly one of them; blank lines skipped)."""
    given = [name for name, value in (("--text", text), ("--texts", texts), ("--texts_file", texts_file))
             if value is not None]
    if not given:
        raise ValueError("give a query: --text=\"a red circle\" (rank the images), or --texts=\"a,b,c\" / "
                         "--texts_file=FILE (rank texts)")
    if len(given) > 1:
        raise ValueError(f"give one of --text, --texts, --texts_file; got {' and '.join(given)}")
    if texts_file is not None:
        if not os.path.isfile(texts_file):
            raise ValueError(f"--texts_file={texts_file!r} is not a file")
        with open(texts_file, encoding="utf-8") as f:
            out = [line.strip() for line in f if line.strip()]
    else:
        out = [text.strip()] if text is not None else [t.strip() for t in texts if t.strip()]
    if not out:
        raise ValueError(f"{given[0]} holds no text")
    return out


def plan(images: str | None, image: str | None, text: str | None, texts: Sequence[str] | None,
         texts_file: str | None) -> tuple[str, list[str], str, list[str]]:
    """(mode, image paths, their root for display, texts) of the flags; every input error before a model loads."""
    if bool(images) == bool(image):
        raise ValueError("give --images=FOLDER (rank images, or score every pair) or --image=FILE (rank texts), "
                         "not both" if images else "give --images=FOLDER or --image=FILE")
    candidates = read_texts(text, texts, texts_file)
    if image:
        if not os.path.isfile(image):
            raise ValueError(f"--image={image!r} is not a file")
        return "rank_texts", [image], os.path.dirname(os.path.abspath(image)), candidates
    paths = cli.list_images(images)
    return ("rank_images" if text is not None else "matrix"), paths, images, candidates


def export_images(folder: str, count: int = 16) -> list[str]:
    """Copies the first `count` test images of the embedded dataset (easy_vqa_captions, the shipped PNG bytes) into
    `folder` as NNNN_COLOR_SHAPE.png, with classes.txt ("a red circle", one class a line); returns the image paths."""
    from mmjax.data import easy_vqa_captions as ev  # pylint: disable=import-outside-toplevel  (TF)
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if not 1 <= count <= 1000:
        raise ValueError(f"--count must be in 1..1000 (the test split's images); got {count}")
    root = os.path.join(ev._easy_vqa_data_dir(), "test", "images")  # pylint: disable=protected-access
    os.makedirs(folder, exist_ok=True)
    written = []
    for image_id in range(count):
        source = os.path.join(root, f"{image_id}.png")
        with Image.open(source) as im:
            m = ev.measure_image(np.asarray(im.convert("RGB")))
        dest = os.path.join(folder, f"{image_id:04d}_{m.color}_{m.shape}.png")
        shutil.copyfile(source, dest)
        written.append(dest)
    with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"a {name}\n" for name in ev.CLASS_NAMES))
    return written


# ----------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Predictor:
    """A loaded model with what scoring needs: how to preprocess images and tokenize texts, and its kind."""

    model: Any
    params: Any
    kind: str                    # DUAL_ENCODER | MATCHING
    family: str                  # the model config's name
    tokenizer: Any
    config: Any                  # a ConfigDict with .data (image_size, mean / std, sources): mmjax.generate.load_images
    max_len: int
    source: str                  # the workdir or model directory
    step: int | None = None
    batch_size: int = 64
    loss: str | None = None      # dual encoders: softmax | sigmoid | a ranking loss
    logit_scale: float | None = None
    logit_bias: float = 0.0
    _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

    def preprocess(self, paths: Sequence[str]) -> np.ndarray:
        """float32 [N, S, S, 3]: the images as the run's evaluation saw them (mmjax.generate.load_images)."""
        from mmjax import generate  # pylint: disable=import-outside-toplevel

        return generate.load_images(list(paths), self.config)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 [T, max_len] of `texts`."""
        return self.tokenizer.encode(list(texts), self.max_len)

    def _fn(self, name: str) -> Callable:
        """The jitted forward `name` (encode_image, encode_text or itm), built once."""
        if name not in self._jitted:
            import jax  # pylint: disable=import-outside-toplevel

            model = self.model
            if name == "itm":
                def fn(params, image, ids, mask):
                    logits = model.apply({"params": params}, {"image": image, "text_ids": ids,
                                                              "text_mask": mask})["itm_logits"]
                    return jax.nn.softmax(logits.astype("float32"), axis=-1)[:, 1]
            else:
                def fn(params, *inputs):
                    return model.apply({"params": params}, *inputs, method=name)
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def _batched(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """`name` over host arrays, batch_size rows at a time (the last block padded: one compilation)."""
        n = len(arrays[0])
        b = max(1, min(self.batch_size, n))
        out = []
        for start in range(0, n, b):
            block = [a[start:start + b] for a in arrays]
            m = len(block[0])
            block = [np.pad(x, [(0, b - m)] + [(0, 0)] * (x.ndim - 1)) for x in block]
            out.append(np.asarray(self._fn(name)(self.params, *block))[:m])
        return np.concatenate(out)

    def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
        """Unit embeddings [N, E] of preprocessed images (dual encoders)."""
        return self._batched("encode_image", pixels)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings [T, E] of `texts` (dual encoders)."""
        return self._batched("encode_text", *self.tokenize(texts))

    def scores(self, pixels: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """[N, T] scores of every (image, text) pair: cosine similarity, or the ITM match probability."""
        if self.kind == DUAL_ENCODER:
            return self.image_embeddings(pixels) @ self.text_embeddings(texts).T
        ids, mask = self.tokenize(texts)
        n, t = len(pixels), len(texts)
        pairs = np.stack(np.meshgrid(np.arange(n), np.arange(t), indexing="ij"), -1).reshape(-1, 2)
        b = max(1, min(self.batch_size, len(pairs)))
        out = []
        for start in range(0, len(pairs), b):  # as ITMRetrievalEvaluator.scores: blocks of pairs, gathered
            block = pairs[start:start + b]
            m = len(block)
            block = np.pad(block, ((0, b - m), (0, 0)))  # one shape: one compilation
            probs = self._fn("itm")(self.params, pixels[block[:, 0]], ids[block[:, 1]], mask[block[:, 1]])
            out.append(np.asarray(probs)[:m])
        return np.concatenate(out).reshape(n, t)

    def score_files(self, paths: Sequence[str], texts: Sequence[str], chunk: int = 1024) -> np.ndarray:
        """[N, T] scores of the image files against `texts`, `chunk` images preprocessed at a time (so a large
        folder never sits in memory whole; a dual encoder embeds the texts once)."""
        text_embeds = self.text_embeddings(texts) if self.kind == DUAL_ENCODER else None
        out = []
        for start in range(0, len(paths), chunk):
            pixels = self.preprocess(paths[start:start + chunk])
            out.append(self.image_embeddings(pixels) @ text_embeds.T if text_embeds is not None
                       else self.scores(pixels, texts))
            logging.info("scored %d/%d images", min(start + chunk, len(paths)), len(paths))
        return np.concatenate(out)

    def probabilities(self, scores: np.ndarray, axis: int) -> np.ndarray | None:
        """Probabilities of `scores` [N, T]: the softmax over `axis` (the candidates) at the logit scale, SigLIP's
        per-pair sigmoid; None for matching models (the score is a probability already) and for the ranking
        losses (no calibrated scale)."""
        if self.kind == MATCHING:
            return None
        if self.loss == "sigmoid":
            return 1.0 / (1.0 + np.exp(-(self.logit_scale * scores + self.logit_bias)))
        if self.loss != "softmax" or self.logit_scale is None:
            return None
        logits = self.logit_scale * scores.astype(np.float64)
        logits -= logits.max(axis=axis, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=axis, keepdims=True)

    def describe(self) -> dict[str, Any]:
        """What the scores and probabilities are, for predictions.json and the table's header."""
        if self.kind == MATCHING:
            score, prob = "ITM match probability (of each pair alone)", None
        else:
            score = "cosine similarity"
            prob = {"softmax": f"softmax over the candidates at logit scale {self.logit_scale:.4g}",
                    "sigmoid": f"sigmoid(scale * cos + bias), scale {self.logit_scale:.4g}, bias "
                               f"{self.logit_bias:.4g}"}.get(self.loss, None)
        return {"family": self.family, "kind": self.kind, "source": self.source, "step": self.step,
                "score": score, "probability": prob}


def model_kind(model: Any, name: str) -> str:
    """DUAL_ENCODER or MATCHING for a model that can score image-text pairs; anything else a ValueError saying
    why."""
    if name in REGION_MODELS:
        raise ValueError(f"a {name} model reads region features (data.regions), not images: mmjax.predict "
                         "scores image-text pairs with dual encoders (clip, coca, dual_encoder) and matching models "
                         "(vilt, fusion)")
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        modalities = tuple(getattr(model, "modalities", ("image", "text")))
        if not {"image", "text"} <= set(modalities):
            raise ValueError(f"this dual_encoder pairs {' and '.join(modalities)}, not images and texts")
        return DUAL_ENCODER
    if hasattr(model, "image_memory"):
        raise ValueError(f"a {name} model is a captioner: it scores no image-text pairs; caption images with "
                         "`python -m mmjax.generate --workdir=RUN --images=DIR`")
    if name in ("vilt", "fusion"):
        if not getattr(model, "itm_head", False):
            raise ValueError(f"this {name} model has no ITM head (e.g. a VQA fine-tune): it cannot score "
                             "image-text pairs")
        towers = getattr(model, "towers", None)
        if towers is not None and set(towers) != {"image", "text"}:
            raise ValueError(f"this fusion model's towers are {sorted(towers)}, not image and text")
        return MATCHING
    raise ValueError(f"a {name} model cannot score image-text pairs: mmjax.predict takes dual encoders (clip, coca, "
                     "dual_encoder) and matching models (vilt, fusion)")


def _find(model_config: Any, key: str) -> Any:
    """The first value of `key` in a nested model config (towers included), or None."""
    if isinstance(model_config, dict):
        if model_config.get(key) is not None:
            return model_config[key]
        for value in model_config.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _model_dir_data(path: str, model: Any, model_config: dict, normalization: str | None) -> tuple[Any, int]:
    """(a ConfigDict with the .data that preprocessing reads, the text length) of a model directory: the model's
    image size and text length, the directory's normalisation (preprocessor_config.json) or a preset."""
    import ml_collections  # pylint: disable=import-outside-toplevel

    from mmjax.data import pipeline, preprocess, sources  # pylint: disable=import-outside-toplevel
    from mmjax.models.text import TextTransformer  # pylint: disable=import-outside-toplevel

    size = _find(model_config, "image_size") or getattr(model, "image_size", None)
    if not size:
        raise ValueError(f"{path}: the model config gives no image_size")
    max_len = _find(model_config, "max_len") or getattr(model, "max_len", None) or TextTransformer.max_len
    processor = os.path.join(path, "preprocessor_config.json")
    proc = {}
    if os.path.exists(processor):
        with open(processor) as f:
            proc = json.load(f)
    if normalization:
        mean, std = preprocess.mean_std(normalization)
    elif proc:
        mean, std = preprocess.mean_std((proc.get("image_mean", (0.5,) * 3), proc.get("image_std", (0.5,) * 3)))
    else:
        mean, std = preprocess.mean_std("clip" if model_config.get("name") == "clip" else "half")
        logging.warning("%s has no preprocessor_config.json: normalising images with mean %s std %s "
                        "(--normalization to choose)", path, mean, std)
    data = pipeline.default_data_config()
    data.sources.model = sources.source_config()
    if proc.get("do_center_crop"):  # HF image processors: the shorter side resized, then the central square
        data.sources.model.image.resize = "shorter"
    data.update(dict(image_size=int(size), mean=tuple(mean), std=tuple(std), normalization=None))
    return ml_collections.ConfigDict(dict(data=data)), int(max_len)


def load_predictor(*, workdir: str | None = None, model_dir: str | None = None, step: int | None = None,
                   tokenizer: str | None = None, normalization: str | None = None,
                   batch_size: int = 64) -> Predictor:
    """A Predictor of a training run (`workdir`, its latest checkpoint or `step`) or of a model directory."""
    import jax  # pylint: disable=import-outside-toplevel

    from mmjax import checkpoint, pretrained  # pylint: disable=import-outside-toplevel
    from mmjax.data import pipeline, preprocess  # pylint: disable=import-outside-toplevel
    from mmjax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    if bool(workdir) == bool(model_dir):
        raise ValueError("give --workdir (a training run) or --model (a converted / Hugging Face directory)")
    if model_dir and os.path.isdir(os.path.join(model_dir, pretrained.RUN_CHECKPOINTS)):
        workdir, model_dir = model_dir, None  # a training run given as --model: read it as a run
    path = workdir or model_dir
    if not os.path.isdir(path):
        raise ValueError(f"{'--workdir' if workdir else '--model'}={path!r} is not a directory")
    if workdir:
        if not os.path.exists(os.path.join(workdir, pretrained.CONFIG_FILE)):
            raise ValueError(f"--workdir={workdir!r} is not a training run (no config.json)")
        if not os.path.isdir(os.path.join(workdir, pretrained.RUN_CHECKPOINTS)):
            raise ValueError(f"--workdir={workdir!r} has no checkpoint yet (no {pretrained.RUN_CHECKPOINTS}/)")
        config = checkpoint.load_config(workdir)
        if config.data.get("image_canvas"):
            raise ValueError(f"{workdir} reads padded images (data.image_canvas): not supported by mmjax.predict")
    elif step is not None:
        raise ValueError("--step needs --workdir (a training run)")
    try:
        ckpt = pretrained.load_checkpoint(path, step)
    except ValueError as e:  # its messages name the init_from fields; here the flags
        raise ValueError(str(e).replace("init_from.path", "--workdir" if workdir else "--model")
                         .replace("init_from.step", "--step")) from None
    name = ckpt.model_config.get("name")
    model = build_model(ckpt.model_config)
    kind = model_kind(model, name)
    if workdir:
        if normalization:
            config.data.normalization = normalization
        max_len = int(config.data.max_len)
    else:
        config, max_len = _model_dir_data(model_dir, model, ckpt.model_config, normalization)
    if tokenizer:
        tok = Tokenizer.from_path(tokenizer)
    elif workdir:
        own = os.path.join(workdir, "tokenizer.json")  # as mmjax.generate finds a run's tokenizer
        tok = Tokenizer.from_path(own) if os.path.exists(own) else pipeline.load_tokenizer(config.data)
    elif any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.txt")):
        tok = Tokenizer.from_path(model_dir)
    else:
        raise ValueError(f"no tokenizer.json or vocab.txt in --model={model_dir!r}: give --tokenizer=PATH")
    preprocess.mean_std(config.data.get("normalization") or (tuple(config.data.mean), tuple(config.data.std)))
    predictor = Predictor(model=model, params=jax.device_put(ckpt.params), kind=kind, family=name, tokenizer=tok,
                          config=config, max_len=max_len, source=os.path.abspath(path), step=ckpt.step,
                          batch_size=batch_size)
    if kind == DUAL_ENCODER:
        predictor.loss = getattr(model, "loss", "softmax")
        if "logit_scale" in ckpt.params:
            cap = getattr(model, "logit_scale_max", math.inf)
            predictor.logit_scale = float(math.exp(min(float(ckpt.params["logit_scale"]), cap)))
        predictor.logit_bias = float(ckpt.params.get("logit_bias", 0.0))
    return predictor


# ----------------------------------------------------------------------------------------------- predictions


def predict(predictor: Predictor, mode: str, paths: Sequence[str], texts: Sequence[str],
            root: str | None = None) -> dict[str, Any]:
    """Every score of `mode` (rank_images: images against texts[0]; rank_texts: texts for paths[0]; matrix: every
    pair) and its ranking, best first, as predictions.json holds them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    scores = predictor.score_files(list(paths), texts)
    names = [os.path.relpath(p, root) if root else p for p in paths]
    axis = 0 if mode == "rank_images" else 1  # the candidates: the images, or each image's texts
    probs = predictor.probabilities(scores, axis)
    result = {"mode": mode, "model": predictor.describe(), "images": names, "image_paths": [os.path.abspath(p)
                                                                                           for p in paths],
              "texts": list(texts), "scores": scores.tolist(),
              "probabilities": None if probs is None else probs.tolist()}

    def row(rank: int, i: int, j: int, **extra: Any) -> dict[str, Any]:
        return {"rank": rank, "score": float(scores[i, j]),
                "probability": None if probs is None else float(probs[i, j]), **extra}

    if mode == "rank_images":
        order = np.argsort(-scores[:, 0], kind="stable")
        result["ranking"] = [row(r + 1, i, 0, image=names[i], path=result["image_paths"][i])
                             for r, i in enumerate(order)]
    elif mode == "rank_texts":
        order = np.argsort(-scores[0], kind="stable")
        result["ranking"] = [row(r + 1, 0, j, text=texts[j]) for r, j in enumerate(order)]
    else:
        best = np.argmax(scores, axis=1)  # the first best text on a tie
        order = np.argsort(-scores[np.arange(len(paths)), best], kind="stable")
        result["ranking"] = [row(r + 1, i, best[i], image=names[i], path=result["image_paths"][i],
                                 text=texts[best[i]]) for r, i in enumerate(order)]
    return result


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def format_table(result: dict[str, Any], top: int) -> str:
    """A markdown table of the `top` best rows: rank, score, probability, then the image and / or text."""
    mode = result["mode"]
    columns = {"rank_images": ["image"], "rank_texts": ["text"], "matrix": ["image", "best text"]}[mode]
    model = result["model"]
    head = {"rank_images": f"images ranked for {result['texts'][0]!r}",
            "rank_texts": f"texts ranked for {result['images'][0]}",
            "matrix": f"each image's best text of {len(result['texts'])}"}[mode]
    lines = [f"{head} ({model['family']}: score = {model['score']}; probability = {model['probability'] or 'none'})",
             "", "| rank | score | probability | " + " | ".join(columns) + " |",
             "|---:|---:|---:|" + "---|" * len(columns)]
    for r in result["ranking"][:top]:
        values = [r.get("image"), r.get("text")] if mode == "matrix" else [r.get(columns[0])]
        lines.append("| " + " | ".join(_cell(v) for v in [r["rank"], r["score"], r["probability"], *values]) + " |")
    if len(result["ranking"]) > top:
        lines.append(f"({len(result['ranking']) - top} more rows in predictions.json)")
    return "\n".join(lines)


def _thumbnail(path: str) -> Any:
    """The image at `path` as an RGB PIL image, its longest side at most THUMBNAIL pixels."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        return im


def _sheet_items(result: dict[str, Any], top: int) -> list[tuple[str, str, list[str]]]:
    """(image path, title, caption lines) of each contact-sheet tile."""
    def numbers(r: dict) -> str:
        return f"score {r['score']:.4f}" + ("" if r["probability"] is None else f", p {r['probability']:.3f}")

    if result["mode"] == "rank_texts":
        lines = [f"#{r['rank']} {r['text']} ({numbers(r)})" for r in result["ranking"][:top]]
        return [(result["image_paths"][0], result["images"][0], lines)]
    items = []
    for r in result["ranking"][:top]:
        caption = [numbers(r)] + ([r["text"]] if result["mode"] == "matrix" else [])
        items.append((r["path"], f"#{r['rank']} {r['image']}", caption))
    return items


def write_contact_sheet_html(result: dict[str, Any], top: int, path: str) -> str:
    """A self-contained HTML page of the top images (base64 PNG thumbnails) with their scores; returns `path`."""
    tiles = []
    for image_path, title, lines in _sheet_items(result, top):
        buf = io.BytesIO()
        _thumbnail(image_path).save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        text = "".join(f"<div>{html.escape(line)}</div>" for line in lines)
        tiles.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title)}">'
                     f"<figcaption><b>{html.escape(title)}</b>{text}</figcaption></figure>")
    model = result["model"]
    query = {"rank_images": f"Images ranked for “{result['texts'][0]}”",
             "rank_texts": "Texts ranked for one image",
             "matrix": f"Each image's best text of {len(result['texts'])}"}[result["mode"]]
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(query)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;vertical-align:top;margin:.5em;
width:{THUMBNAIL + 40}px}} img{{width:{THUMBNAIL}px;image-rendering:pixelated;border:1px solid #ccc}}
figcaption{{font-size:.8em;word-wrap:break-word}}</style></head><body>
<h2>{html.escape(query)}</h2>
<p>{html.escape(model['family'])} from {html.escape(model['source'])}{'' if model['step'] is None else
                                                                    f" (step {model['step']})"}: score =
{html.escape(model['score'])}; probability = {html.escape(model['probability'] or 'none')}</p>
{''.join(tiles)}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write_contact_sheet_png(result: dict[str, Any], top: int, path: str) -> str:
    """A matplotlib grid of the top images (or the one image beside its top texts) with scores; returns `path`."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    items = _sheet_items(result, top)
    if result["mode"] == "rank_texts":
        image_path, title, lines = items[0]
        fig, (ax, text_ax) = plt.subplots(1, 2, figsize=(9, max(3.0, 0.3 * len(lines) + 1)),
                                          gridspec_kw=dict(width_ratios=[1, 2]))
        ax.imshow(_thumbnail(image_path))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        text_ax.axis("off")
        text_ax.text(0, 1, "\n".join(_short(line, 70) for line in lines), va="top", fontsize=8, family="monospace")
    else:
        cols = min(5, len(items))
        rows = math.ceil(len(items) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (image_path, title, lines) in zip(axes.flat, items):
            ax.imshow(_thumbnail(image_path))
            ax.set_title("\n".join(_short(t, 30) for t in [title, *lines]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def write_outputs(result: dict[str, Any], out_dir: str, top: int) -> list[str]:
    """predictions.json, contact_sheet.html and contact_sheet.png in `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "predictions.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return [json_path, write_contact_sheet_html(result, top, os.path.join(out_dir, "contact_sheet.html")),
            write_contact_sheet_png(result, top, os.path.join(out_dir, "contact_sheet.png"))]


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> None:
    """CLI entry point: the table, then the files written; input errors end in one line."""
    del argv
    cli_logging.quiet_foreign_info()
    f = flags.FLAGS
    try:
        if f.export_images:
            written = export_images(f.export_images, f.count)
            print(f"wrote {len(written)} images and classes.txt to {f.export_images}")
            return
        if f.top < 1 or f.batch_size < 1:
            raise ValueError("--top and --batch_size must be >= 1")
        if bool(f.workdir) == bool(f.model):
            raise ValueError("give --workdir (a training run) or --model (a converted / Hugging Face directory)")
        if f.model and not f.out:
            raise ValueError("--model needs --out (the folder to write the predictions into)")
        mode, paths, root, texts = plan(f.images, f.image, f.text, f.texts, f.texts_file)
        predictor = load_predictor(workdir=f.workdir, model_dir=f.model, step=f.step, tokenizer=f.tokenizer,
                                   normalization=f.normalization, batch_size=f.batch_size)
        result = predict(predictor, mode, paths, texts, root)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(str(e))
    print(format_table(result, f.top))
    written = write_outputs(result, f.out or os.path.join(f.workdir, "predictions"), f.top)
    print("wrote " + " ".join(written))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
