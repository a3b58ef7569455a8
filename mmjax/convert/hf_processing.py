"""Tokenizer and image-processor files beside an exported Hugging Face model, so transformers preprocesses as we do.

    files = write_tokenizer("hf_dir", tokenizer, max_len=24)     # tokenizer.json + tokenizer_config.json
    files += write_image_processing("hf_dir", "clip", config.data, with_tokenizer=True)

`AutoTokenizer.from_pretrained(hf_dir)(texts, padding="max_length", max_length=L, truncation=True)` then gives the
ids and mask of our `Tokenizer.encode(texts, L)`: [CLS] tokens [SEP] [PAD]..., the text truncated (never [SEP]).
`AutoImageProcessor` resizes and normalises as the run's eval pipeline did: "exact" resize -> ViTImageProcessor
(squash to S x S), "shorter" -> CLIPImageProcessor (shorter side S, centre crop), image_canvas -> ViltImageProcessor
(shorter side S, padded, pixel_mask; HF caps the longer side at 1333/800 * S, not at our image_canvas, and rounds
sides down to size_divisor, so non-square images may differ). All resample bilinearly with PIL (ours: TF's
antialiased bilinear): resized pixels agree closely, not bit for bit; an image already S x S is resized by neither.
Each has a PIL backend in transformers 5: no torchvision needed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import tokenizers
from tokenizers import processors

from mmjax.data.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

# model_type -> the processor class that pairs its tokenizer with its image processor.
PROCESSORS: dict[str, str] = {"clip": "CLIPProcessor", "vilt": "ViltProcessor"}
IMAGE_MODELS = ("clip", "vilt", "vit")  # the exported families whose inputs are pixels
PIL_BILINEAR = 2


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def write_tokenizer(out_dir: str | os.PathLike, tokenizer: Tokenizer, max_len: Optional[int]) -> list[str]:
    """Writes tokenizer.json (adding [CLS] ... [SEP] as `Tokenizer.encode` does) and tokenizer_config.json; returns
    the file names. `max_len` (the run's text length) becomes model_max_length."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TOKENIZER_FILE)
    tokenizer.save(path)
    tok = tokenizers.Tokenizer.from_file(path)
    name = {k: tok.id_to_token(getattr(tokenizer, f"{k}_id")) for k in ("cls", "sep", "pad", "unk", "mask")}
    cls, sep = name["cls"], name["sep"]
    # `encode` bypasses whatever post-processor the run's file carries; HF applies it, so it must be ours.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_id), (sep, tokenizer.sep_id)])
    tok.no_truncation()  # transformers sets both per call
    tok.no_padding()
    tok.save(path)
    config: dict[str, Any] = {
        # Generic class: the tokenizer.json is used as it is (a BertTokenizer class could rebuild it from a vocab).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": cls, "sep_token": sep, "pad_token": name["pad"], "unk_token": name["unk"],
        "mask_token": name["mask"], "padding_side": "right", "truncation_side": "right",
    }
    if max_len:
        config["model_max_length"] = int(max_len)
    _write_json(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), config)
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]


def _mean_std(data_config: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The run's normalisation: a data.normalization preset, else data.mean / data.std."""
    if data_config.get("normalization"):
        # Imported only here: it pulls in TensorFlow, which plain mean / std do not need.
        from mmjax.data import preprocess  # pylint: disable=import-outside-toplevel

        mean, std = preprocess.mean_std(data_config["normalization"])
    else:
        mean, std = data_config["mean"], data_config["std"]
    return [float(v) for v in mean], [float(v) for v in std]


def _eval_resize(data_config: Mapping[str, Any]) -> str:
    """The resize mode ("exact" | "shorter") of the source the run evaluates on (data.eval_source, else the first)."""
    sources = {**(data_config.get("eval_sources") or {}), **(data_config.get("sources") or {})}
    key = data_config.get("eval_source") or next(iter(data_config.get("sources") or {}), None)
    image = (sources.get(key) or {}).get("image") or {}
    return image.get("resize") or "exact"


def image_processor_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json for the run's eval image preprocessing (data.image_size, normalisation, resize)."""
    size = int(data_config["image_size"])
    mean, std = _mean_std(data_config)
    config: dict[str, Any] = dict(do_resize=True, resample=PIL_BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True)
    if data_config.get("image_canvas"):
        config.update(image_processor_type="ViltImageProcessor", size={"shortest_edge": size},
                      size_divisor=int(data_config.get("size_divisor") or 32), do_pad=True)
    elif _eval_resize(data_config) == "shorter":
        config.update(image_processor_type="CLIPImageProcessor", size={"shortest_edge": size},
                      do_center_crop=True, crop_size={"height": size, "width": size})
    else:
        config.update(image_processor_type="ViTImageProcessor", size={"height": size, "width": size})
    return config


def write_image_processing(out_dir: str | os.PathLike, model_type: str, data_config: Mapping[str, Any], *,
                           with_tokenizer: bool) -> list[str]:
    """For image models: preprocessor_config.json, and processor_config.json when a tokenizer is there too (so
    AutoProcessor pairs them); returns the file names written (none for text-only families)."""
    if model_type not in IMAGE_MODELS:
        return []
    out_dir = os.fspath(out_dir)
    _write_json(os.path.join(out_dir, IMAGE_PROCESSOR_FILE), image_processor_config(data_config))
    if not (with_tokenizer and model_type in PROCESSORS):
        return [IMAGE_PROCESSOR_FILE]
    _write_json(os.path.join(out_dir, PROCESSOR_FILE), {"processor_class": PROCESSORS[model_type]})
    return [IMAGE_PROCESSOR_FILE, PROCESSOR_FILE]
