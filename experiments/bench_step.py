"""Benchmark one train step of every model family on CPU: mmjax (JAX/Flax) vs shape-matched PyTorch references.

Run on an IDLE machine, from the repo root: two busy processes on 2 cores slow each other several-fold, and
torch's 2-thread OpenMP far more (a smoke run's CLIP step took 5.5 s at 2 threads next to another job and 0.12 s at
1). The full run is long: the base rows take ~5 s (CLIP, batch 16) to ~30 s (VisualBERT, 164 tokens x 3 rows)
per step, 18 steps per framework, up to three frameworks per row, plus torch.compile's compile times: about two
hours on the 2-core machine.

    /work/venv/bin/python experiments/bench_step.py --families=clip,vilt,uniter,vilbert,lxmert,visualbert,fusion \\
        --shapes=small,base --steps=15 --warmup=3 --base_batch=16 --threads=2

Smoke test (numbers meaningless; small shape, tiny batch, 1 thread so a busy machine does not stall torch; each
family ~30 s without torch.compile, CLIP's torch.compile ~1 minute more):

    /work/venv/bin/python experiments/bench_step.py --families=vilt --shapes=small --small_batch=4 --steps=2 \\
        --warmup=1 --skip_compile --matmul_n=512 --threads=1 --out=/tmp/bench_step.json

What is measured, per family x shape (timed back to back in one process, in the order ours, eager, compile;
models freed and gc.collect() between):
  ours     the trainer's step exactly (mmjax/train.py): build_model -> get_task -> make_optimizer ->
           create_train_state -> jit_train_step (jax.jit of train_step with in/out shardings, state donated) on a
           1-device mesh under `jax.set_mesh(mesh), nn.logical_axis_rules(rules)`, lowered and compiled once. The
           model config is resolved from a synthetic DatasetMeta (vocabulary, region count / width / classes, the
           embedded source's colour / shape hard-negative attributes), and the synthetic numpy batches hold every
           key of `pipeline.train_batch_shapes` (so also image_id, source, label, other_{color,shape}_text_ids /
           _mask, region_targets) with valid values: [CLS] words [SEP] pad texts of varied lengths (CLIP: words then
           eos = vocab - 1), ids inside the vocabulary, real regions first with valid boxes and soft class targets.
           The task gets a stand-in tokenizer with the same special ids (small: pad 0 unk 1 cls 2 sep 3 mask 4;
           base: BERT's 0/100/101/102/103), so MLM's random replacements stay inside the vocabulary.
           Step FLOPs: mmjax.perf.step_flops(compiled) (XLA's cost analysis of the whole step).
  eager    the Hugging Face reference (below), float32, train mode, exact-erf "gelu", every dropout 0 as in our
           configs (the HF defaults of 0.1 are overridden), torch.set_num_threads(--threads); one step = the same
           mismatches / MLM masks / region masks drawn with torch ops + one forward over the same stacked rows as
           our task + the same losses + backward + clip_grad_norm_(config.optimizer.grad_clip) + AdamW(lr, betas,
           eps; weight decay on >= 2-D weights except embedding tables / cls / logit scale, as mmjax.optim) +
           zero_grad(set_to_none=True).
  compile  the same module under `torch.compile(module)` (default inductor); the first step (tracing + compiling
           forward and backward) is reported as compile_s, then --warmup and --steps steady-state steps. A failure
           is recorded as its error's first line and the run goes on (--skip_compile turns it off).
  peak     float32 N x N matmul FLOP/s (jitted jnp.dot and torch.mm, 2 N^3 flops, median), in the same run.
Times are medians over --steps timed steps after --warmup untimed ones (each jax step ends in
block_until_ready; torch eager is synchronous). ratio = ours examples/s / torch examples/s (> 1: mmjax faster).
Fractions of peak: ours' XLA FLOPs / step time / the jax matmul peak, and the same FLOP count over the torch step
time for torch (an estimate: the torch step does the same model math, see the notes for what differs).

Shapes:
  small   width 192, heads 3, MLP 768, vocab 1000, 16 text tokens; image models 64x64 images in 8x8 patches (64
          patches); CLIP projection 128; 4 layers: CLIP 4 per tower, ViLT / UNITER / VisualBERT depth 4,
          ViLBERT text_depth 2 + co_depth 2 (image_depth 0, as its configs), LXMERT l_layers 2 / r_layers 2 /
          x_layers 2 (each stream goes through 4 layers), fusion image tower 2 + text tower 2 + cross_attention block
          depth 2 (likewise). Region models: 36 regions (data.regions.max_regions) of 192-d features and 25 region
          classes (the embedded source's regions_from_boxes widths: 8x8x3 crops, 24 classes + background). Other
          fields (optimizer, objectives, negatives) are each family's `tiny` config (fusion: its default config).
          Batches (SMALL_BATCH; --small_batch overrides all): CLIP 128 (~0.95 GFLOP per example, XLA's count),
          the matching families 32: their steps cost ~1.9-2.9 GFLOP per example (3-4 sequences each), so ~60-95
          GFLOP per step, ~0.5-1 s at the ~100 GFLOP/s these shapes reach on 2 cores.
  base    configs/<family>.py:base as it stands; region models 36 regions of 2048-d features (Faster R-CNN) and
          1601 classes (LXMERT: 1600, its object labels). CPU batch --base_batch (16), ViLT-B/32 at 384x384
          --vilt_base_batch (default half of --base_batch: ~185 tokens x 3 sequences per example make it the most
          expensive row). configs/fusion.py has no base variant: fusion's base row is recorded as skipped.

Our matching task (mmjax/tasks/matching.py) runs ONE forward per step over stacked rows: B true pairs + B
mismatches (ITM; mismatch kinds by task.itm.negatives: in-batch captions and colour / shape hard negatives at
1 : 1 : 2) + B MLM rows (15% of the words, 80/10/10), + B visual rows where region objectives (MRFR / MRC) use
conditional masking (UNITER), or the visual masks ride on the MLM rows with joint masking (ViLBERT, LXMERT). So
the transformer sees 3B sequences per step (ViLT, VisualBERT, ViLBERT, LXMERT, fusion) or 4B (UNITER). The torch
steps stack the same rows in the same order and run one forward too; they apply each head only to the rows its
loss reads (ours' models apply every head to every row and the task slices; XLA may prune the unused rows).

References and fairness notes per family:
  clip        transformers.CLIPModel, forward(return_loss=True): HF's patch conv has no bias (ours has one), vision
              LayerNorm eps set to ours (1e-6), text pooled at the eos token in both. Ours also computes in-batch
              accuracies for its metrics.
  vilt        transformers.ViltForMaskedLM (ViltModel with its pooler + the tied MLM head) + an ITM head
              nn.Linear(hidden, 2) on the pooler output, as ours. Same 3B rows. HF's ViltEmbeddings.visual_embed
              resizes the position table and draws a patch order per image in a Python loop (its real behaviour,
              kept: per-row host overhead ours does not have).
  uniter      transformers.VisualBertForPreTraining (VisualBertModel + its tied MLM head + seq_relationship as ITM)
              as a single-stream stand-in with visual_embedding_dim = our region width, plus MRFR / MRC heads
              (transform + linear, as ours) and WPA (the same IPOT, 50 iterations, in torch). Same 4B rows.
              Differences: no box / location embedding and no region LayerNorms (UNITER embeds the 7-d box
              geometry: 7 x width MACs per region, negligible); VisualBERT LayerNorms text and regions together.
  visualbert  transformers.VisualBertForPreTraining, the model ours follows (MLM + sentence-image prediction). Same
              3B rows. Matched up to ours' region_boxes input, which VisualBERT ignores in both.
  lxmert      transformers.LxmertForPreTraining with the same l / r / x layers, visual_feat_dim = our region width,
              visual_pos_dim 4, num_object_labels = our class count, task_qa and the attribute loss off; its
              obj_predict_head shares one transform between the object-class and feature-regression decoders (ours
              has a transform each: one width x width dense per region row less in torch). Same 3B rows.
  vilbert     no Hugging Face model. LXMERT is not a fair stand-in: a ViLBERT co-attention layer has per stream a
              cross-attention + FFN and then a self-attention + FFN (24 d^2 MACs per token), an LXMERT
              cross-modality layer one shared cross-attention + self-attention + one FFN (16 d^2), so LXMERT would
              do ~2/3 of the co-layers' work. torch is recorded as null with that reason.
  fusion      mmjax's generic towers + fusion block model has no Hugging Face counterpart: ours only.

Threads: torch.set_num_threads(--threads). XLA:CPU sizes its intra-op pool from the CPUs this process may run on,
so when --threads is below the CPU count the process is pinned (sched_setaffinity) to --threads CPUs before jax
is imported; both frameworks then use the same cores. XLA_FLAGS is left as the environment sets it and recorded.
Allocator: like `python -m mmjax.train`, the benchmark re-executes itself under TCMalloc where it is installed
(mmjax/host_malloc.py; MMJAX_TCMALLOC=0 keeps glibc's malloc), so both frameworks, in one process, run on the
same allocator; which one is recorded in the JSON.
The JSON (--out) holds the machine, versions, args, command, per family and shape the raw step times and every
derived number, and the markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_step.json")
FAMILIES = ("clip", "vilt", "uniter", "vilbert", "lxmert", "visualbert", "fusion")
SHAPES = ("small", "base")

# The small shape (module docstring).
SMALL = dict(width=192, depth=4, heads=3, mlp_dim=768, vocab=1000, max_len=16, image_size=64, patch_size=8,
             embed_dim=128, regions=36, region_feat_dim=192, region_classes=25)
# Small-shape batches: CLIP as its tiny config; the matching families sized for a ~0.3-1.5 s step on 2 cores.
SMALL_BATCH = {"clip": 128, "vilt": 32, "uniter": 32, "vilbert": 32, "lxmert": 32, "visualbert": 32, "fusion": 32}
# Region inputs of the base shape: 36 Faster R-CNN boxes of 2048-d features, Visual Genome classes.
BASE_REGIONS = dict(regions=36, region_feat_dim=2048, region_classes=1601)
BASE_REGION_CLASSES = {"lxmert": 1600}
REGION_FAMILIES = ("uniter", "vilbert", "lxmert", "visualbert")
# Stand-in tokenizer ids (pad, unk, cls, sep, mask): small vocabularies, and BERT's for the 30522-word base.
SMALL_SPECIAL = dict(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4)
BERT_SPECIAL = dict(pad_id=0, unk_id=100, cls_id=101, sep_id=102, mask_id=103)
SOURCE = "easy_vqa"  # the embedded source's key, which every family's config uses
TORCH_NONE = {
    "vilbert": ("no Hugging Face ViLBERT; LXMERT is not a fair stand-in: its cross-modality layer (one shared "
                "cross-attention + self-attention + one FFN per stream, 16 d^2 MACs per token) does ~2/3 of a "
                "ViLBERT co-attention layer's work (cross-attention + FFN + self-attention + FFN, 24 d^2)"),
    "fusion": "no Hugging Face counterpart of mmjax's generic towers + fusion-block model",
}


class Skip(Exception):
    """A family x shape that is not measured (the reason is recorded)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {FAMILIES}")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: small, base")
    p.add_argument("--steps", type=int, default=15, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both frameworks")
    p.add_argument("--small_batch", type=int, default=None, help="batch of every small row (default: SMALL_BATCH)")
    p.add_argument("--base_batch", type=int, default=16, help="CPU batch of the base rows")
    p.add_argument("--vilt_base_batch", type=int, default=None,
                   help="batch of ViLT-B/32 at 384x384 (default: half of --base_batch)")
    p.add_argument("--skip_torch", action="store_true", help="measure only mmjax")
    p.add_argument("--skip_compile", action="store_true", help="no torch.compile reference")
    p.add_argument("--matmul_n", type=int, default=2048, help="N of the N x N float32 matmul peak")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    args = p.parse_args(argv)
    for name, allowed in (("families", FAMILIES), ("shapes", SHAPES)):
        bad = [v for v in getattr(args, name).split(",") if v and v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; known: {list(allowed)}")
    return args


def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` CPUs (before jax is imported) so XLA's pool matches torch's."""
    if not hasattr(os, "sched_getaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def cpu_model() -> str | None:
    """'model name' from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def timed(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Runs fn() warmup + steps times; returns the timed steps' seconds (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def allocator_info() -> dict:
    """The host allocator this process runs on (mmjax/host_malloc.py) and MMJAX_TCMALLOC."""
    from mmjax import host_malloc

    return {"allocator": host_malloc.loaded_allocator(), "MMJAX_TCMALLOC": os.environ.get("MMJAX_TCMALLOC")}


def first_line(e: BaseException) -> str:
    """'TypeName: first line of the message' (for errors recorded in the JSON)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Machine peak

def matmul_peak(n: int, reps: int = 10) -> dict:
    """Median float32 N x N matmul GFLOP/s in jax (jitted jnp.dot) and torch (if importable)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flops = 2.0 * n ** 3
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    t_jax = statistics.median(timed(lambda: jax.block_until_ready(dot(a, b)), reps, 2))
    out = {"n": n, "jax_gflops": flops / t_jax / 1e9}
    try:
        import torch
        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        t_torch = statistics.median(timed(lambda: torch.mm(ta, tb), reps, 2))
        out["torch_gflops"] = flops / t_torch / 1e9
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------------------------
# Workloads: a family's config at a shape, and what its synthetic data looks like

@dataclasses.dataclass
class Workload:
    """One family x shape: the resolved-to-be config and the sizes its synthetic data and DatasetMeta have."""

    family: str
    shape: str
    config: Any  # ml_collections.ConfigDict (model fields still to be resolved from the meta)
    batch: int
    vocab: int
    special: dict  # pad_id, unk_id, cls_id, sep_id, mask_id
    regions: dict | None = None  # regions, region_feat_dim, region_classes (region families)

    @property
    def image_size(self) -> int:
        """data.image_size (every config's batches carry an image, region families' included)."""
        return int(self.config.data.image_size)

    @property
    def max_len(self) -> int:
        """data.max_len: text positions."""
        return int(self.config.data.max_len)

    def describe(self) -> dict:
        """The shape facts recorded in the JSON."""
        out = {"image_size": self.image_size, "max_len": self.max_len, "vocab_size": self.vocab}
        if self.regions:
            out.update(self.regions)
        return out


def load_config(family: str, arg: str | None):
    """configs/<family>.py:get_config(arg), loaded by path as the trainer's config flag does."""
    spec = importlib.util.spec_from_file_location(f"{family}_config", os.path.join(REPO, "configs", f"{family}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _small_config(family: str):
    """The family's tiny config (fusion: its default) with the small shape's model and data sizes."""
    s = SMALL
    layer = dict(width=s["width"], heads=s["heads"], mlp_dim=s["mlp_dim"])
    if family == "fusion":
        c = load_config("fusion", None)
        c.model.towers.image.update(patch_size=s["patch_size"], depth=2, **layer)
        c.model.towers.text.update(depth=2, **layer)
        c.model.fusion_args.update(width=s["width"], depth=2, num_heads=s["heads"], mlp_dim=s["mlp_dim"])
        c.data.image_size = s["image_size"]
    else:
        c = load_config(family, "tiny")
    if family == "clip":
        c.model.image.update(patch_size=s["patch_size"], depth=s["depth"], **layer)
        c.model.text.update(depth=s["depth"], vocab_size=s["vocab"], **layer)
        c.model.embed_dim = s["embed_dim"]
        c.data.image_size = s["image_size"]
    elif family == "vilt":
        c.model.update(patch_size=s["patch_size"], depth=s["depth"], vocab_size=s["vocab"], **layer)
        c.data.image_size = s["image_size"]
    elif family in ("uniter", "visualbert"):
        c.model.update(depth=s["depth"], vocab_size=s["vocab"], **layer)
    elif family == "vilbert":
        c.model.update(text_depth=2, image_depth=0, co_depth=2, vocab_size=s["vocab"], **layer)
    elif family == "lxmert":
        c.model.update(l_layers=2, r_layers=2, x_layers=2, vocab_size=s["vocab"], **layer)
    c.data.max_len = s["max_len"]
    return c


def workload(family: str, shape: str, args: argparse.Namespace) -> Workload:
    """The config, batch and data sizes of `family` at `shape`; raises Skip where there is nothing to measure."""
    if shape == "small":
        config = _small_config(family)
        batch = args.small_batch or SMALL_BATCH[family]
        vocab, special = SMALL["vocab"], dict(SMALL_SPECIAL)
        regions = ({k: SMALL[k] for k in ("regions", "region_feat_dim", "region_classes")}
                   if family in REGION_FAMILIES else None)
    else:
        if family == "fusion":
            raise Skip("configs/fusion.py has no base variant")
        config = load_config(family, "base")
        batch = args.base_batch
        if family == "vilt":
            batch = args.vilt_base_batch or max(1, args.base_batch // 2)
        model = config.model.text if family == "clip" else config.model
        vocab = int(model.vocab_size)
        special = dict(BERT_SPECIAL)
        regions = None
        if family in REGION_FAMILIES:
            regions = dict(BASE_REGIONS, region_classes=BASE_REGION_CLASSES.get(family,
                                                                                BASE_REGIONS["region_classes"]))
    if batch < 2:
        raise ValueError(f"{family} {shape}: batch {batch} < 2 (in-batch negatives need two examples)")
    config.train.batch_size = batch
    return Workload(family=family, shape=shape, config=config, batch=batch, vocab=vocab, special=special,
                    regions=regions)


def dataset_meta(w: Workload):
    """A DatasetMeta as the embedded source would describe it, with the workload's sizes (nothing is read)."""
    from mmjax.data import easy_vqa_captions, pipeline, sources

    src = w.config.data.sources[SOURCE]
    words = {"color": easy_vqa_captions.COLORS, "shape": easy_vqa_captions.SHAPES}
    fields = dict(key=SOURCE, kind=src.kind, splits={}, class_names=easy_vqa_captions.CLASS_NAMES,
                  attributes={name: tuple(words[name]) for name in src.negatives})
    if w.regions and w.config.data.regions.enabled:
        fields.update(num_regions=w.regions["regions"], region_feature_dim=w.regions["region_feat_dim"],
                      region_classes=w.regions["region_classes"])
    meta = pipeline.DatasetMeta(sources={SOURCE: sources.SourceMeta(**fields)}, eval_source=SOURCE,
                                vocab_size=w.vocab, train_sources=(SOURCE,))
    return dataclasses.replace(meta, model_keys=tuple(pipeline.batch_shapes(w.config.data, meta)))


def stand_in_tokenizer(w: Workload):
    """What the matching task reads of a tokenizer: special ids, vocab_size, continuation_table."""
    import types

    import numpy as np

    return types.SimpleNamespace(vocab_size=w.vocab, continuation_table=lambda: np.zeros(w.vocab, bool),
                                 **w.special)


def _texts(rng, batch: int, max_len: int, vocab: int, special: dict, clip_layout: bool):
    """(ids, mask) int32 [batch, max_len], right-padded with varied lengths: CLIP's words then eos = vocab - 1,
    else [CLS] words [SEP]."""
    import numpy as np

    pos = np.arange(max_len)[None]
    if clip_layout:
        lengths = rng.integers(2, max_len + 1, size=batch)
        ids = rng.integers(1, vocab - 1, size=(batch, max_len))
        ids = np.where(pos == (lengths[:, None] - 1), vocab - 1, ids)
    else:
        lengths = rng.integers(3, max_len + 1, size=batch)
        first_word = max(special.values()) + 1
        ids = rng.integers(first_word, vocab, size=(batch, max_len))
        ids = np.where(pos == 0, special["cls_id"], ids)
        ids = np.where(pos == (lengths[:, None] - 1), special["sep_id"], ids)
    mask = (pos < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, special["pad_id"]).astype(np.int32)
    return ids, mask


def _swap_one_word(rng, ids, mask, vocab: int, special: dict):
    """A hard-negative caption: each text with one word (not [CLS] / [SEP]) replaced by another word id."""
    out = ids.copy()
    lengths = mask.sum(axis=1)
    first_word = max(special.values()) + 1
    for i, n in enumerate(lengths):
        p = int(rng.integers(1, max(int(n) - 1, 2)))
        out[i, p] = first_word + (int(out[i, p]) - first_word + int(rng.integers(1, vocab - first_word))) % (
            vocab - first_word)
    return out


def synthetic_batches(w: Workload, meta, n: int = 2, seed: int = 0) -> list[dict]:
    """n numpy batches holding every key of pipeline.train_batch_shapes, with valid values (module docstring)."""
    import numpy as np

    from mmjax.data import pipeline

    shapes = pipeline.train_batch_shapes(w.config.data, meta, w.batch)
    rng = np.random.default_rng(seed)
    b = w.batch
    out = []
    for _ in range(n):
        batch = {}
        ids, mask = _texts(rng, b, w.max_len, w.vocab, w.special, clip_layout=w.family == "clip")
        batch["text_ids"], batch["text_mask"] = ids, mask
        for name in meta.attributes:
            batch[f"other_{name}_text_ids"] = _swap_one_word(rng, ids, mask, w.vocab, w.special)
            batch[f"other_{name}_text_mask"] = mask.copy()
        if "region_feats" in shapes:
            r, f = shapes["region_feats"].shape[1:]
            real = rng.integers(max(1, r // 2), r + 1, size=b)
            rmask = (np.arange(r)[None] < real[:, None]).astype(np.int32)
            lo = rng.uniform(0.0, 0.6, size=(b, r, 2))
            hi = lo + rng.uniform(0.05, 0.4, size=(b, r, 2))
            boxes = np.concatenate([lo, np.minimum(hi, 1.0)], axis=-1).astype(np.float32)  # ymin xmin ymax xmax
            batch["region_feats"] = rng.standard_normal((b, r, f), dtype=np.float32) * rmask[..., None].astype(
                np.float32)
            batch["region_boxes"] = boxes * rmask[..., None].astype(np.float32)
            batch["region_mask"] = rmask
            if "region_targets" in shapes:
                c = shapes["region_targets"].shape[-1]
                logits = rng.standard_normal((b, r, c)).astype(np.float32)
                probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
                batch["region_targets"] = (probs / probs.sum(axis=-1, keepdims=True) * rmask[..., None]).astype(
                    np.float32)
        for key, s in shapes.items():
            if key in batch:
                continue
            if key == "image":
                batch[key] = rng.standard_normal(s.shape, dtype=np.float32)
            elif key == "image_id":
                batch[key] = np.arange(b, dtype=np.int32)
            elif key == "label":
                batch[key] = rng.integers(0, len(meta.source().class_names or (1,)), size=b).astype(np.int32)
            elif key in ("source",) or s.dtype == np.int32:
                batch[key] = np.zeros(s.shape, np.int32)
            else:
                batch[key] = rng.standard_normal(s.shape, dtype=np.float32)
        for key, s in shapes.items():
            if batch[key].shape != tuple(s.shape) or batch[key].dtype != s.dtype:
                raise AssertionError(f"synthetic {key} {batch[key].dtype}{batch[key].shape} != "
                                     f"{s.dtype}{tuple(s.shape)}")
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------------------------
# mmjax

def custom_calls(compiled: Any) -> dict[str, int]:
    """Custom-call targets in the compiled step's HLO and their counts (e.g. cuDNN fused attention, cuBLAS GEMMs);
    {} where the text is not available."""
    try:
        text = compiled.as_text()
    except Exception:  # best-effort metadata
        return {}
    counts: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', text or ""):
        counts[target] = counts.get(target, 0) + 1
    return dict(sorted(counts.items()))


def bench_ours(config: Any, meta: Any, tokenizer: Any, np_batches: list[dict], steps: int, warmup: int,
               trace_dir: str | None = None, trace_steps: int = 3) -> dict:
    """The trainer's jitted, donated, sharded train step on the given numpy batches (config resolved from meta).

    With trace_dir, `trace_steps` more steps run under jax.profiler.trace after the timed ones, and the result
    holds the compiled step's HLO text (experiments/profile_step.py reads both).
    """
    import flax.linen as nn
    import jax

    from mmjax import optim, perf, sharding
    from mmjax import state as state_lib
    from mmjax import train as mtrain
    from mmjax.data import pipeline
    from mmjax.models import build_model
    from mmjax.tasks import get_task

    mesh = sharding.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = sharding.logical_rules(config.sharding.rules)
    resolved = state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, meta=meta, tokenizer=tokenizer, mesh=mesh)
    shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, shapes, config.seed)
    n_params = state_lib.count_params(boxed)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = state_lib.create_train_state(model, shapes, tx, mesh, rules, config.seed, boxed)

    step_fn = mtrain.jit_train_step(task, tx, schedule, mesh, shardings)
    rng = jax.random.key(config.seed + 1)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batches = [sharding.make_global_batch(b, mesh) for b in np_batches]
        t = time.perf_counter()
        compiled = step_fn.lower(state, batches[0], rng).compile()
        compile_s = time.perf_counter() - t
        flops = perf.step_flops(compiled)
        memory = perf.memory(compiled)
        calls = custom_calls(compiled)

        holder = {"state": state, "i": 0, "metrics": None}

        def one_step():
            """One compiled step on the next batch, waited for."""
            i = holder["i"]
            holder["state"], holder["metrics"] = compiled(holder["state"], batches[i % len(batches)], rng)
            jax.block_until_ready((holder["state"], holder["metrics"]))
            holder["i"] = i + 1

        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = timed(one_step, steps, warmup)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / max(1, steps + warmup)
        metrics = jax.device_get(holder["metrics"])
        extra = {}
        if trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(trace_steps):
                    one_step()
            extra = {"hlo_text": compiled.as_text(), "trace_steps": trace_steps}
    return {**extra, "page_faults_per_step": faults, "params": n_params, "compile_s": compile_s,
            "step_s": statistics.median(times), "step_times_s": times,
            "step_flops": flops, "memory": memory, "custom_calls": calls, "loss_last": float(metrics["loss"]),
            "losses_last": {k: float(v) for k, v in metrics.items() if k.endswith("_loss")},
            "resolved": resolved}


# ----------------------------------------------------------------------------------------------------------------
# PyTorch references

class Unmatched(Exception):
    """No fair Hugging Face reference for a family (the reason is recorded, torch = null)."""


# Parameters that never decay, as mmjax.optim.decay_mask (embedding tables, cls tokens, logit scale) in HF names.
TORCH_NO_DECAY = re.compile(r"(word_embeddings|position_embedding|token_type_embeddings|token_embedding|"
                            r"class_embedding|cls_token|logit_scale)")


def _torch_modules():
    """The torch Modules of the references, defined on first use (torch is imported lazily)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class HeadTransform(nn.Module):
        """BERT prediction-head transform (Dense -> exact GELU -> LayerNorm), as mmjax heads.HeadTransform."""

        def __init__(self, width: int, eps: float):
            """dense (width x width) and LayerNorm(eps)."""
            super().__init__()
            self.dense = nn.Linear(width, width)
            self.ln = nn.LayerNorm(width, eps=eps)

        def forward(self, x):
            """x [..., D] -> [..., D]."""
            return self.ln(F.gelu(self.dense(x)))

    class TokenPrediction(nn.Module):
        """HeadTransform + Linear(num_outputs), as mmjax heads.token_prediction (MRFR / MRC)."""

        def __init__(self, width: int, num_outputs: int, eps: float):
            """transform + decoder Linear(width, num_outputs)."""
            super().__init__()
            self.transform = HeadTransform(width, eps)
            self.decoder = nn.Linear(width, num_outputs)

        def forward(self, x):
            """x [..., D] -> [..., num_outputs]."""
            return self.decoder(self.transform(x))

    class ClipRef(nn.Module):
        """transformers.CLIPModel; forward(batch) -> the contrastive loss."""

        def __init__(self, hf):
            """Wraps a transformers.CLIPModel."""
            super().__init__()
            self.hf = hf

        def forward(self, rows: dict, targets: dict):
            """The CLIP contrastive loss of the batch (rows = CLIPModel's inputs; targets unused)."""
            return self.hf(**rows, return_loss=True).loss

    class MatchingRef(nn.Module):
        """A HF encoder + heads + our matching losses over the stacked rows (module docstring).

        `encode(rows)` -> (text_tokens [N, L, D], image_tokens [N, M, D] or None, pooled [N, D]); heads are
        applied to the rows their losses read: ITM to rows [0, 2B), MLM to the MLM block, MRFR / MRC to the
        visual block. Losses as mmjax.losses (ITM and MLM cross-entropy, MRFR MSE, MRC KL, WPA with IPOT)."""

        def __init__(self, family, hf, weights: dict, extra: dict):
            """hf: the transformers model; weights: our objective weights; extra: heads HF lacks."""
            super().__init__()
            self.family, self.hf, self.weights = family, hf, weights
            self.extra = nn.ModuleDict(extra)

        def encode(self, rows):
            """rows -> (text tokens, image / region tokens, pooled) from the HF encoder."""
            hf, f = self.hf, self.family
            length = rows["text_ids"].shape[1]
            if f == "vilt":
                out = hf.vilt(input_ids=rows["text_ids"], attention_mask=rows["text_mask"],
                              pixel_values=rows["pixel_values"], pixel_mask=rows["pixel_mask"])
                seq = out.last_hidden_state
                return seq[:, :length], seq[:, length:], out.pooler_output
            if f in ("uniter", "visualbert"):
                out = hf.visual_bert(input_ids=rows["text_ids"], attention_mask=rows["text_mask"],
                                     visual_embeds=rows["region_feats"], visual_attention_mask=rows["region_mask"])
                seq = out.last_hidden_state
                return seq[:, :length], seq[:, length:], out.pooler_output
            if f == "lxmert":
                out = hf.lxmert(input_ids=rows["text_ids"], attention_mask=rows["text_mask"],
                                visual_feats=rows["region_feats"], visual_pos=rows["region_boxes"],
                                visual_attention_mask=rows["region_mask"])
                return out.language_output, out.vision_output, out.pooled_output
            raise ValueError(f)

        def mlm_logits(self, text):
            """The HF tied MLM head on text tokens."""
            if self.family == "vilt":
                return self.hf.mlm_score(text)
            return self.hf.cls.predictions(text)

        def itm_logits(self, pooled):
            """ITM logits [N, 2] from pooled vectors (ViLT: our Linear head; else HF's seq_relationship)."""
            if self.family == "vilt":
                return self.extra["itm"](pooled)
            return self.hf.cls.seq_relationship(pooled)

        def forward(self, rows: dict, targets: dict):
            """rows, targets (TorchSteps.prepare) -> the weighted sum of our objectives' losses."""
            text, image, pooled = self.encode(rows)
            b = targets["batch"]
            blocks = targets["blocks"]
            w = self.weights
            total = text.new_zeros(())

            def part(x, name):
                """Rows of block `name` of x."""
                return x[blocks[name] * b: (blocks[name] + 1) * b]

            itm_labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)])
            if w.get("itm"):
                total = total + w["itm"] * F.cross_entropy(self.itm_logits(pooled[: 2 * b]).float(), itm_labels)
            if w.get("mlm"):
                logits = self.mlm_logits(part(text, "mlm"))
                total = total + w["mlm"] * F.cross_entropy(logits.flatten(0, 1).float(),
                                                           targets["mlm_labels"].flatten(), ignore_index=-100)
            if w.get("mrfr") or w.get("mrc"):
                vis = part(image, "visual")
                masked = targets["region_masked"]
                denom = masked.sum().clamp(min=1)
                if self.family == "lxmert":
                    heads = self.hf.obj_predict_head(vis)
                    feat_pred, class_logits = heads["feat"], heads["obj"]
                else:
                    feat_pred, class_logits = self.extra["mrfr"](vis), self.extra["mrc"](vis)
                if w.get("mrfr"):
                    err = (feat_pred.float() - targets["region_feats"]).square().mean(-1)
                    total = total + w["mrfr"] * (err * masked).sum() / denom
                if w.get("mrc"):
                    t = targets["region_targets"]
                    kl = (torch.xlogy(t, t) - t * F.log_softmax(class_logits.float(), dim=-1)).sum(-1)
                    total = total + w["mrc"] * (kl * masked).sum() / denom
            if w.get("wpa"):
                txt_mask = targets["wpa_text_mask"]
                img_mask = rows["region_mask"][: 2 * b] > 0
                cost = cosine_cost(text[: 2 * b].float(), image[: 2 * b].float())
                cost = torch.where(txt_mask[:, :, None] & img_mask[:, None, :], cost, torch.zeros_like(cost))
                plan = ipot(cost.detach(), txt_mask, img_mask, iterations=targets["wpa_iterations"])
                dist = (cost * plan).sum(dim=(1, 2))
                total = total + w["wpa"] * torch.where(itm_labels > 0, dist, -dist).sum() / dist.shape[0]
            return total

    return dict(HeadTransform=HeadTransform, TokenPrediction=TokenPrediction, ClipRef=ClipRef,
                MatchingRef=MatchingRef)


def cosine_cost(x, y, eps: float = 1e-5):
    """1 - cos(x_n, y_m) [B, N, M] (as mmjax.objectives.cosine_cost)."""
    from torch.nn import functional as F

    x = F.normalize(x, dim=-1, eps=eps)
    y = F.normalize(y, dim=-1, eps=eps)
    return 1.0 - x @ y.transpose(1, 2)


def ipot(cost, mask_x, mask_y, beta: float = 0.5, iterations: int = 50):
    """IPOT transport plan [B, N, M] without gradient, the same iterations as mmjax.objectives.ipot (k = 1)."""
    import torch

    with torch.no_grad():
        joint = (mask_x[:, :, None] & mask_y[:, None, :]).float()
        n_x = mask_x.sum(1, keepdim=True).float()
        n_y = mask_y.sum(1, keepdim=True).float()
        fx, fy = mask_x.float(), mask_y.float()

        def inv(num, n, s):
            """mask / (n * s), 0 where n * s is 0 (as mmjax.objectives.ipot)."""
            d = n * s
            return torch.where(d > 0, num / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))

        a = torch.exp(-cost / beta) * joint
        sigma = fx / n_x.clamp(min=1.0)
        t = joint
        for _ in range(iterations):
            q = a * t
            delta = inv(fy, n_y, torch.einsum("bn,bnm->bm", sigma, q))
            sigma = inv(fx, n_x, torch.einsum("bnm,bm->bn", q, delta))
            t = sigma[:, :, None] * q * delta[:, None, :]
        return t * joint


def _hf_common(config: Any, vocab: int) -> dict:
    """Config fields every BERT-like HF reference shares with ours: sizes, exact GELU, no dropout, eps 1e-12."""
    m = config.model
    layers = {} if config.model.name == "lxmert" else {"num_hidden_layers": int(m.depth)}
    return dict(vocab_size=vocab, hidden_size=m.width, num_attention_heads=m.heads, **layers,
                intermediate_size=m.get("mlp_dim") or 4 * m.width, hidden_act="gelu", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, max_position_embeddings=config.data.max_len, type_vocab_size=2)


def build_torch_reference(w: Workload, meta: Any):
    """(module, description) of the family's torch reference; raises Unmatched(reason) where there is none."""
    if w.family in TORCH_NONE:
        raise Unmatched(TORCH_NONE[w.family])
    import transformers
    from torch import nn

    mods = _torch_modules()
    config = w.config
    if w.family == "clip":
        return mods["ClipRef"](transformers.CLIPModel(torch_clip_config(config))), "transformers.CLIPModel"
    task = config.task
    weights = {k: float(v) for k, v in task.objectives.items() if float(v) > 0}
    unsupported = sorted(set(weights) - {"mlm", "itm", "wpa", "mrfr", "mrc"})
    if unsupported or float(task.itm.negatives.get("mined", 0.0)) > 0 or task.mlm.whole_word:
        raise Unmatched(f"the torch step does not implement objectives {unsupported} / mined negatives / "
                        "whole-word masking")
    common = _hf_common(config, w.vocab)
    width, eps = int(config.model.width), 1e-12
    extra = {}
    if w.family == "vilt":
        m = config.model
        hf = transformers.ViltForMaskedLM(transformers.ViltConfig(
            **common, modality_type_vocab_size=2, layer_norm_eps=m.get("ln_epsilon", eps), image_size=m.image_size,
            patch_size=m.patch_size, num_channels=3, qkv_bias=True, max_image_length=-1))
        extra["itm"] = nn.Linear(width, 2)
        what = "transformers.ViltForMaskedLM + nn.Linear(hidden, 2) ITM head on the pooler output"
    elif w.family in ("uniter", "visualbert"):
        hf = transformers.VisualBertForPreTraining(transformers.VisualBertConfig(
            **common, visual_embedding_dim=meta.region_feature_dim, layer_norm_eps=eps, pad_token_id=0,
            special_visual_initialize=True))
        what = "transformers.VisualBertForPreTraining"
        if w.family == "uniter":
            extra["mrfr"] = mods["TokenPrediction"](width, meta.region_feature_dim, eps)
            extra["mrc"] = mods["TokenPrediction"](width, meta.region_classes, eps)
            what += " (stand-in) + MRFR / MRC heads + IPOT WPA"
    elif w.family == "lxmert":
        m = config.model
        hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(
            **common, l_layers=m.l_layers, r_layers=m.r_layers, x_layers=m.x_layers,
            visual_feat_dim=meta.region_feature_dim, visual_pos_dim=4, num_object_labels=meta.region_classes,
            task_matched=True, task_mask_lm=True, task_obj_predict=True, task_qa=False, visual_obj_loss=True,
            visual_attr_loss=False, visual_feat_loss=True))
        what = "transformers.LxmertForPreTraining (task_qa and attribute loss off)"
    else:
        raise Unmatched(f"no reference for {w.family}")
    return mods["MatchingRef"](w.family, hf, weights, extra), what


def torch_clip_config(config: Any):
    """A transformers CLIPConfig with the same shapes as config.model."""
    from transformers import CLIPConfig

    m = config.model
    img, txt = m.image, m.text
    vocab = txt.vocab_size
    text_config = dict(
        vocab_size=vocab, hidden_size=txt.width, intermediate_size=txt.mlp_dim, num_hidden_layers=txt.depth,
        num_attention_heads=txt.heads, max_position_embeddings=config.data.max_len, hidden_act="gelu",
        layer_norm_eps=1e-5, attention_dropout=0.0, pad_token_id=0, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, projection_dim=m.embed_dim)
    vision_config = dict(
        hidden_size=img.width, intermediate_size=img.mlp_dim, num_hidden_layers=img.depth,
        num_attention_heads=img.heads, image_size=config.data.image_size, patch_size=img.patch_size, num_channels=3,
        hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0, projection_dim=m.embed_dim)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=m.embed_dim,
                      logit_scale_init_value=m.logit_scale_init or math.log(1 / 0.07))


class TorchSteps:
    """Turns numpy batches into torch tensors and, each step, draws our task's mismatches and masks with torch
    ops and stacks the rows (module docstring); `prepare(i)` -> (rows, targets) for the reference's forward."""

    def __init__(self, w: Workload, meta: Any, np_batches: list[dict], seed: int):
        """Torch copies of the numpy batches and the task's masking / negative settings."""
        import numpy as np
        import torch

        self.w, self.meta = w, meta
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = []
        for b in np_batches:
            t = {}
            for k, v in b.items():
                if k == "image":
                    t["pixel_values"] = torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))
                elif v.dtype == np.int32:
                    t[k] = torch.from_numpy(v.astype(np.int64))
                else:
                    t[k] = torch.from_numpy(np.ascontiguousarray(v))
            self.batches.append(t)
        if w.family == "clip":
            return
        task = w.config.task
        self.weights = {k: float(v) for k, v in task.objectives.items() if float(v) > 0}
        kinds = ["in_batch"] + [f"other_{name}" for name in meta.attributes]
        negatives = dict(task.itm.negatives)
        probs = [float(negatives.get(k, 0.0)) for k in kinds]
        self.kinds = [k for k, p in zip(kinds, probs) if p > 0]
        self.kind_probs = torch.tensor([p for p in probs if p > 0], dtype=torch.float)
        self.visual = bool(self.weights.get("mrfr") or self.weights.get("mrc"))
        self.joint = task.masking == "joint"
        self.mask_prob = float(task.mlm.mask_prob)
        self.region_mask_prob = float(task.mrm.mask_prob)
        self.wpa_iterations = int(task.wpa.iterations)
        self.special = torch.tensor(sorted(set(w.special.values())), dtype=torch.long)

    def _choose(self, valid, prob: float):
        """~prob of the valid units per row, at least one where any is valid (as mmjax.objectives._choose)."""
        import torch

        u = torch.rand(valid.shape, generator=self.gen)
        chosen = (u < prob) & valid
        # At least one: the valid unit with the smallest score, where a row has none chosen.
        first = torch.where(valid, u, torch.full_like(u, 2.0)).argmin(dim=1)
        none = ~chosen.any(dim=1) & valid.any(dim=1)
        chosen[none, first[none]] = True
        return chosen

    def _mask_text(self, ids, mask):
        """BERT masking (80% [MASK], 10% random word, 10% kept) -> (masked ids, labels with -100 elsewhere)."""
        import torch

        maskable = (mask > 0) & ~torch.isin(ids, self.special)
        chosen = self._choose(maskable, self.mask_prob)
        action = torch.rand(ids.shape, generator=self.gen)
        first_word = int(self.special.max()) + 1
        random_ids = torch.randint(first_word, self.w.vocab, ids.shape, generator=self.gen)
        replaced = torch.where(action < 0.8, torch.full_like(ids, self.w.special["mask_id"]),
                               torch.where(action < 0.9, random_ids, ids))
        return torch.where(chosen, replaced, ids), torch.where(chosen, ids, torch.full_like(ids, -100))

    def prepare(self, i: int) -> tuple[dict, dict]:
        """The stacked rows and loss targets of step i (batch i % n)."""
        import torch

        batch = self.batches[i % len(self.batches)]
        if self.w.family == "clip":
            return {"pixel_values": batch["pixel_values"], "input_ids": batch["text_ids"],
                    "attention_mask": batch["text_mask"]}, {}
        ids, mask = batch["text_ids"], batch["text_mask"]
        b = ids.shape[0]
        rows_idx = torch.arange(b)
        # Mismatches: an in-batch caption of another example, or the example's caption with a word swapped.
        kind = torch.multinomial(self.kind_probs, b, replacement=True, generator=self.gen)
        other = (rows_idx + torch.randint(1, b, (b,), generator=self.gen)) % b
        cand_ids = [ids[other] if k == "in_batch" else batch[f"{k}_text_ids"] for k in self.kinds]
        cand_mask = [mask[other] if k == "in_batch" else batch[f"{k}_text_mask"] for k in self.kinds]
        neg_ids = torch.stack(cand_ids)[kind, rows_idx]
        neg_mask = torch.stack(cand_mask)[kind, rows_idx]
        masked_ids, labels = self._mask_text(ids, mask)
        text_ids, text_mask = [ids, neg_ids, masked_ids], [mask, neg_mask, mask]
        blocks = {"itm_true": 0, "itm_false": 1, "mlm": 2}
        targets = {"batch": b, "blocks": blocks, "mlm_labels": labels}
        region_rows = None
        if "region_feats" in batch:
            feats, rmask = batch["region_feats"], batch["region_mask"]
            region_rows = [feats, feats, feats]
            if self.visual:
                masked = self._choose(rmask > 0, self.region_mask_prob)
                hidden = feats * (~masked)[..., None].float()
                targets.update(region_masked=masked.float(), region_feats=feats, region_targets=batch.get(
                    "region_targets"))
                if self.joint:
                    region_rows[2] = hidden
                    blocks["visual"] = 2
                else:
                    text_ids.append(ids)
                    text_mask.append(mask)
                    region_rows.append(hidden)
                    blocks["visual"] = 3
        n = len(text_ids)
        rows = {"text_ids": torch.cat(text_ids), "text_mask": torch.cat(text_mask)}
        if region_rows is not None:
            rows["region_feats"] = torch.cat(region_rows)
            rows["region_boxes"] = batch["region_boxes"].repeat(n, 1, 1)[..., [1, 0, 3, 2]]  # x1 y1 x2 y2
            rows["region_mask"] = batch["region_mask"].repeat(n, 1)
        if self.w.family == "vilt":
            pixels = batch["pixel_values"]
            rows["pixel_values"] = pixels.repeat(n, 1, 1, 1)
            rows["pixel_mask"] = torch.ones((n * b, pixels.shape[2], pixels.shape[3]), dtype=torch.long)
        if self.weights.get("wpa"):
            # Content words ([CLS] and the last real token left out) of the 2B ITM rows, as objectives.content_mask.
            m = torch.cat([mask, neg_mask]) > 0
            length = m.sum(1, keepdim=True)
            pos = torch.arange(m.shape[1])[None]
            targets["wpa_text_mask"] = m & (pos > 0) & (pos < length - 1)
            targets["wpa_iterations"] = self.wpa_iterations
        return rows, targets


def bench_torch(w: Workload, meta: Any, np_batches: list[dict], steps: int, warmup: int, threads: int,
                compile_model: bool) -> dict:
    """The reference's train step (eager, or under torch.compile): prepare rows + forward/loss + backward + clip +
    AdamW + zero_grad. Raises Unmatched where the family has no reference."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(w.config.seed)
    module, what = build_torch_reference(w, meta)
    module = module.float().train()
    n_params = sum(p.numel() for p in module.parameters())
    decay, keep = [], []
    for name, p in module.named_parameters():
        (decay if p.ndim >= 2 and not TORCH_NO_DECAY.search(name) else keep).append(p)
    oc = w.config.optimizer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps)
    params = list(module.parameters())
    data = TorchSteps(w, meta, np_batches, seed=w.config.seed + 1)
    hf = getattr(module, "hf", None)
    attn = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    fn = torch.compile(module) if compile_model else module

    holder = {"i": 0, "loss": None}

    def one_step():
        """prepare rows + forward/loss + backward + clip + AdamW + zero_grad (synchronous on CPU)."""
        rows, targets = data.prepare(holder["i"])
        loss = fn(rows, targets)
        loss.backward()
        if oc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss.detach()
        holder["i"] += 1

    out = {"reference": what, "params": n_params, "attn_implementation": attn, "num_threads": torch.get_num_threads()}
    if compile_model:
        first = []
        for _ in range(2):  # tracing + compiling forward and backward happen in the first step
            t = time.perf_counter()
            one_step()
            first.append(time.perf_counter() - t)
        out.update(compile_s=first[0], first_steps_s=first)
    times = timed(one_step, steps, warmup)
    out.update(step_s=statistics.median(times), step_times_s=times, loss_last=float(holder["loss"]))
    if compile_model:
        torch._dynamo.reset()
    return out


# ----------------------------------------------------------------------------------------------------------------
# One row of the table

def run_row(w: Workload, args: argparse.Namespace, peak: dict) -> dict:
    """ours, eager and compile for one family x shape, and the derived numbers."""
    meta = dataset_meta(w)
    np_batches = synthetic_batches(w, meta)
    tag = f"[{w.family} {w.shape}]"
    print(f"{tag} batch {w.batch}, {w.describe()}", flush=True)
    r: dict = {"batch": w.batch, "shape": w.describe(), "model_keys": list(meta.model_keys)}

    ours = bench_ours(w.config, meta, stand_in_tokenizer(w), np_batches, args.steps, args.warmup)
    gc.collect()
    r["ours"] = ours
    print(f"{tag} ours: {ours['params']:,} params, compile {ours['compile_s']:.1f} s, "
          f"{ours['step_s'] * 1e3:.1f} ms/step, {(ours['step_flops'] or 0) / 1e9:.2f} GFLOP/step, "
          f"loss {ours['loss_last']:.3f}", flush=True)

    for kind, skip, skip_reason in (("eager", args.skip_torch, "--skip_torch"),
                                    ("compile", args.skip_torch or args.skip_compile,
                                     "--skip_torch" if args.skip_torch else "--skip_compile")):
        key = f"torch_{kind}"
        if skip:
            r[key], r[f"{key}_note"] = None, f"skipped ({skip_reason})"
            continue
        try:
            ref = bench_torch(w, meta, np_batches, args.steps, args.warmup, args.threads, kind == "compile")
        except Unmatched as e:
            r[key], r[f"{key}_note"] = None, str(e)
            print(f"{tag} torch {kind}: none ({e})", flush=True)
            continue
        except Exception as e:  # a failed reference (inductor without a compiler, ...) must not end the run
            r[key], r[f"{key}_note"] = None, f"error: {first_line(e)}"
            print(f"{tag} torch {kind}: FAILED {first_line(e)}", flush=True)
            traceback.print_exc(file=sys.stderr)
            continue
        finally:
            gc.collect()
        r[key] = ref
        extra = f", compile (first step) {ref['compile_s']:.1f} s" if kind == "compile" else ""
        print(f"{tag} torch {kind}: {ref['params']:,} params{extra}, {ref['step_s'] * 1e3:.1f} ms/step, "
              f"loss {ref['loss_last']:.3f}", flush=True)
    derive(r, peak)
    return r


def derive(r: dict, peak: dict) -> None:
    """Adds ms/step, examples/s, ratios, GFLOP/s and fractions of the jax matmul peak to row r."""
    b, flops, jax_peak = r["batch"], r["ours"]["step_flops"], peak["jax_gflops"]
    r["step_gflop"] = flops / 1e9 if flops else None
    r["matmul_peak_gflops"] = jax_peak
    for name, res in (("ours", r["ours"]), ("eager", r.get("torch_eager")), ("compile", r.get("torch_compile"))):
        if not res:
            continue
        r[f"{name}_step_ms"] = res["step_s"] * 1e3
        r[f"{name}_examples_per_s"] = b / res["step_s"]
        gflops = flops / res["step_s"] / 1e9 if flops else None
        r[f"{name}_gflops"] = gflops
        r[f"{name}_fraction_of_peak"] = gflops / jax_peak if gflops else None
        if name != "ours":
            r[f"ratio_ours_{name}"] = r["ours_examples_per_s"] / r[f"{name}_examples_per_s"]
    if r.get("torch_compile"):
        r["compile_compile_s"] = r["torch_compile"]["compile_s"]


def markdown_table(results: dict, peak: dict) -> str:
    """The results as a markdown table (one row per family x shape; skipped rows say why)."""
    cols = ["family", "shape", "batch", "mmjax ms/step", "eager ms/step", "compile ms/step", "mmjax ex/s",
            "eager ex/s", "compile ex/s", "mmjax/eager", "mmjax/compile", "GFLOP/step (XLA)", "mmjax GFLOP/s",
            f"mmjax % of peak ({peak['jax_gflops']:.0f})", "eager % of peak", "compile % of peak",
            "mmjax compile s", "torch.compile s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def num(v, fmt):
        """v formatted with fmt, '-' for None."""
        return "-" if v is None else format(v, fmt)

    def pct(v):
        """A fraction as a percentage, '-' for None."""
        return "-" if v is None else f"{100 * v:.1f}%"

    for family, shapes in results.items():
        for shape, r in shapes.items():
            if "skipped" in r or "error" in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error')}"
                lines.append(f"| {family} | {shape} | ({why}) | " + " | ".join(["-"] * (len(cols) - 3)) + " |")
                continue
            ratio_e, ratio_c = r.get("ratio_ours_eager"), r.get("ratio_ours_compile")
            cells = [family, shape, str(r["batch"]), num(r.get("ours_step_ms"), ".1f"),
                     num(r.get("eager_step_ms"), ".1f"), num(r.get("compile_step_ms"), ".1f"),
                     num(r.get("ours_examples_per_s"), ".1f"), num(r.get("eager_examples_per_s"), ".1f"),
                     num(r.get("compile_examples_per_s"), ".1f"),
                     "-" if ratio_e is None else f"**{ratio_e:.2f}x**",
                     "-" if ratio_c is None else f"**{ratio_c:.2f}x**",
                     num(r.get("step_gflop"), ".1f"), num(r.get("ours_gflops"), ".1f"),
                     pct(r.get("ours_fraction_of_peak")), pct(r.get("eager_fraction_of_peak")),
                     pct(r.get("compile_fraction_of_peak")),
                     num(r["ours"]["compile_s"], ".1f"), num(r.get("compile_compile_s"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (module docstring) and writes the JSON and the markdown table."""
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    # Under TCMalloc where installed, as `python -m mmjax.train` runs (a re-execution: nothing before it counts).
    importlib.import_module("mmjax.host_malloc").reexec_with_tcmalloc()
    pin_threads(args.threads)
    os.chdir(REPO)
    import jax

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run: the machine is not idle, "
              "timings will be unreliable", file=sys.stderr)

    peak = matmul_peak(args.matmul_n)
    print(f"matmul peak (float32 {args.matmul_n}^2): jax {peak['jax_gflops']:.1f} GFLOP/s"
          + (f", torch {peak['torch_gflops']:.1f} GFLOP/s" if "torch_gflops" in peak else ""), flush=True)

    results: dict = {}
    for family in [f for f in args.families.split(",") if f]:
        results[family] = {}
        for shape in [s for s in args.shapes.split(",") if s]:
            try:
                w = workload(family, shape, args)
            except Skip as e:
                results[family][shape] = {"skipped": str(e)}
                print(f"[{family} {shape}] skipped: {e}", flush=True)
                continue
            try:
                results[family][shape] = run_row(w, args, peak)
            except Exception as e:  # one broken row must not lose the others' numbers
                results[family][shape] = {"error": first_line(e), "batch": w.batch}
                print(f"[{family} {shape}] FAILED: {first_line(e)}", flush=True)
                traceback.print_exc(file=sys.stderr)
            gc.collect()

    torch_version = None
    if not args.skip_torch:
        import torch
        torch_version = torch.__version__
    table = markdown_table(results, peak)
    record = {
        "benchmark": "bench_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
        "args": vars(args),
        "machine": {
            "processor": platform.processor(), "cpu_model": cpu_model(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "torch": torch_version, "XLA_FLAGS": os.environ.get("XLA_FLAGS"), **allocator_info(),
        },
        "matmul_peak": peak,
        "results": results,
        "table_markdown": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print()
    print(table)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
