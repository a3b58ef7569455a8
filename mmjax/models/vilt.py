"""ViLT (Kim et al. 2021): one transformer over BERT word embeddings and linearly projected image patches.

    text:  word + position + token-type -> LN                         (BERT embeddings)
    image: patch projection (+[MASK] patch for MPP) + interpolated position; [cls] first    (ViT embeddings)
    both + modality-type embedding (text 0, image 1) -> concat [text; image] -> Encoder -> final LN (pre-LN)
    pooled = tanh(Dense(token 0)) (the text [CLS]); heads: MLM (tied decoder), ITM (2-way), MPP (patch pixels),
    and, off by default, HF's VQA classifier (vqa_labels) and retrieval score (rank_head)

Layout and defaults follow Hugging Face `ViltModel` (pre-LN blocks with a final LayerNorm, eps 1e-12, exact GELU,
cls/position/modality embeddings), so its weights map one-to-one; the defaults are the ViLT-B/32 shapes.

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding, ln}   (layers.TextEmbeddings)
    patch_kernel, patch_bias, cls, image_pos_embedding, mask_patch (mpp_head)   (image embeddings)
    modality_embedding, encoder/layer_{i} (encoder/layers with scan_layers), ln_final (norm="pre"), pooler
    heads: mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding), itm_head,
           mpp_transform + mpp_decoder, vqa_head (heads.AnswerClassifier: dense, ln, out), rank_head
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned

REQUIRED_KEYS = ("image", "text_ids", "text_mask")


def hf_positions(table: Array, grid: tuple[int, int], new_grid: tuple[int, int], patch_mask: Array) -> Array:
    """transformers' ViLT patch positions: the [gh*gw, D] table resized bilinearly with aligned corners to each
    image's valid patch grid (rows x columns of real patches, from patch_mask [B, nh*nw]), zeros beyond it;
    -> [B, nh*nw, D] float32. At the training grid with no padding this is the table itself."""
    (gh, gw), (nh, nw) = grid, new_grid
    mask = patch_mask.reshape(-1, nh, nw)
    rows, cols = mask[:, :, 0].sum(axis=1), mask[:, 0, :].sum(axis=1)  # HF: the first column's / row's extent

    def weights(size, n_src, n_out):
        """[B, n_out, n_src]: output position y of an image `size` long samples the table at y (n_src-1)/(size-1)."""
        y = jnp.arange(n_out, dtype=jnp.float32)[None]
        src = y * ((n_src - 1) / jnp.maximum(size[:, None] - 1, 1).astype(jnp.float32))
        lo = jnp.clip(jnp.floor(src), 0, n_src - 1).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n_src - 1)
        frac = src - lo
        w = (jax.nn.one_hot(lo, n_src) * (1 - frac)[..., None] + jax.nn.one_hot(hi, n_src) * frac[..., None])
        return w * (y < size[:, None])[..., None]  # beyond the image: zeros (HF pads the positions with 0)

    grid_table = table.reshape(gh, gw, -1).astype(jnp.float32)
    out = jnp.einsum("bhy,yxd,bwx->bhwd", weights(rows, gh, nh), grid_table, weights(cols, gw, nw))
    return out.reshape(out.shape[0], nh * nw, -1)


class ViLT(nn.Module):
    """Vision-and-Language Transformer: single-stream encoder over [text tokens; image cls + patches].

    `__call__(batch)` reads `image` [B, H, W, C] (any H, W divisible by patch_size: position embeddings are
    interpolated from the image_size grid), `text_ids` / `text_mask` [B, L], optional `text_type_ids` [B, L],
    `image_mask` ([B, N] per patch or [B, H, W] per pixel, 1 = real; default all real) and `patch_mask` [B, N]
    (1 = replace that patch's embedding by the learned [MASK] patch, for MPP; needs mpp_head=True).
    """

    vocab_size: int = 30522
    max_len: int = 40  # text positions
    image_size: int = 384  # the position table covers (image_size // patch_size)^2 patches
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    activation: str = "gelu"  # exact erf GELU, as BERT / HF ViLT
    ln_epsilon: float = 1e-12  # BERT / HF ViLT (timm ViT, which ViLT starts from, uses 1e-6)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    # HF ViltLayer (= timm ViT Block) is pre-LN with a final LayerNorm; "post" gives BERT blocks and no final LN.
    norm: str = "pre"
    type_vocab_size: int = 2  # BERT token types of the text
    modality_type_vocab: int = 2  # 0 = text, 1 = image (NLVR2 uses 2 for a second image)
    # Cap on image patches (ViLT pretrains with 200): keeps the valid patches first, in random order when a
    # "patches" (or, in training, "dropout") rng is given, else in raster order. None = all patches.
    max_image_len: Optional[int] = None
    # Positions at other image sizes: "hf" = transformers' ViltEmbeddings (bilinear with aligned corners, to each
    # image's own valid patch grid from its pixel mask, zeros on padding); else a jax.image.resize method applied to
    # the whole grid ("bicubic").
    pos_interpolation: str = "bicubic"
    mlm_head: bool = True
    itm_head: bool = True
    mpp_head: bool = False  # also owns the learned [MASK] patch; ViLT found MPP unhelpful, so off by default
    # Fine-tuning heads on the pooled output, laid out as Hugging Face's (mmjax.convert.hf_vilt maps them):
    vqa_labels: Optional[int] = None  # VQA classifier with this many answers (ViltForQuestionAnswering)
    rank_head: bool = False  # image-text retrieval score Dense(1) (ViltForImageAndTextRetrieval)
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    image_cls_first = True  # image_tokens[:, 0] is the image [CLS] (word-patch alignment leaves it out)

    def _param(self, name: str, init, names: tuple, shape: tuple) -> Array:
        """A parameter with logical axis `names`, in param_dtype."""
        return self.param(name, partitioned(init, names), shape, self.param_dtype)

    def _embed_image(self, image: Array, image_mask: Optional[Array], patch_mask: Optional[Array],
                     train: bool) -> tuple[Array, Array, Array]:
        """Patch embeddings -> (x [B, 1+N', D], mask [B, 1+N'], patch_index [B, N'] into the full grid)."""
        if image.ndim != 4:
            raise ValueError(f"ViLT expects images [B, H, W, C]; got shape {image.shape}")
        b, h, w, _ = image.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        grid, n = (h // p, w // p), (h // p) * (w // p)

        # Parameters patch_kernel (HWIO, as HF's patch conv) and patch_bias.
        x = layers.patch_embedding(self, image, p, self.width, dtype=self.dtype, param_dtype=self.param_dtype)

        # Created whenever the MPP head is on, so `init` without a patch_mask still makes it.
        mask_patch = self._param("mask_patch", layers.embed_init, ("embed",), (self.width,)) if self.mpp_head else None
        if patch_mask is not None:
            if not self.mpp_head:
                # The [MASK] patch is an MPP parameter; without the head it would be missing from `init`.
                raise ValueError("batch key 'patch_mask' needs mpp_head=True (it owns the [MASK] patch)")
            if patch_mask.shape != (b, n):
                raise ValueError(f"patch_mask must be [B, N] = {(b, n)}; got {patch_mask.shape}")
            # ViLT's MPP swaps the projected patch for a learned [MASK] patch before positions are added, so the
            # model still knows where the masked patch is.
            x = jnp.where(patch_mask[..., None] > 0, mask_patch.astype(self.dtype), x)

        if image_mask is None:
            image_mask = jnp.ones((b, n), jnp.int32)
        elif image_mask.shape == (b, h, w):
            # Pixel mask (HF pixel_mask): a patch is real iff its top-left pixel is (HF's nearest interpolation).
            image_mask = image_mask[:, ::p, ::p].reshape(b, n)
        elif image_mask.shape != (b, n):
            raise ValueError(f"image_mask must be [B, N] = {(b, n)} or [B, H, W] = {(b, h, w)}; "
                             f"got {image_mask.shape}")
        image_mask = image_mask.astype(jnp.int32)

        base_grid = (self.image_size // p,) * 2
        table = self._param("image_pos_embedding", layers.embed_init, ("length", "embed"),
                            (1 + base_grid[0] * base_grid[1], self.width))
        if self.pos_interpolation == "hf":
            x = x + hf_positions(table[1:], base_grid, grid, image_mask).astype(self.dtype)
        else:
            resized = layers.interpolate_pos_embedding(table, base_grid, grid, self.pos_interpolation)
            x = x + resized[1:].astype(self.dtype)[None]

        patch_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        if self.max_image_len is not None and self.max_image_len < n:
            patch_index = self._select_patches(image_mask, train)
            x = jnp.take_along_axis(x, patch_index[..., None], axis=1)
            image_mask = jnp.take_along_axis(image_mask, patch_index, axis=1)

        cls = self._param("cls", layers.embed_init, ("embed",), (self.width,))
        cls = (cls + table[0]).astype(self.dtype)  # the cls position row is never interpolated
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        image_mask = jnp.concatenate([jnp.ones((b, 1), jnp.int32), image_mask], axis=1)
        return x, image_mask, patch_index

    def _select_patches(self, image_mask: Array, train: bool) -> Array:
        """Indices [B, max_image_len] of the kept patches: valid ones first, then padding; sorted (raster)."""
        b, n = image_mask.shape
        if self.has_rng("patches"):
            tiebreak = jax.random.uniform(self.make_rng("patches"), (b, n))
        elif train and self.has_rng("dropout"):
            tiebreak = jax.random.uniform(self.make_rng("dropout"), (b, n))
        else:
            tiebreak = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32) / n, (b, n))
        # Score < 1 for valid patches, >= 1 for padding: argsort keeps valid ones whenever there are enough.
        order = jnp.argsort(tiebreak + (image_mask == 0), axis=1)[:, : self.max_image_len]
        return jnp.sort(order, axis=1).astype(jnp.int32)

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False, image_type: int = 1) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], image_tokens [B, 1+N, D], pooled [B, D], image_mask [B, 1+N],
        patch_index [B, N], and with heads on: mlm_logits [B, L, V], itm_logits [B, 2], mpp_pred [B, N, p*p*C],
        vqa_logits [B, vqa_labels], rank_logits [B, 1]}.

        Hugging Face names too: last_hidden_state [B, L+1+N, D] (= [text_tokens; image_tokens]) and pooler_output
        (= pooled). HF's `logits` of ViltForMaskedLM / ViltForQuestionAnswering / ViltForImageAndTextRetrieval are
        mlm_logits / vqa_logits / rank_logits, also returned as `logits` when that is the model's only head.

        N is the number of image patches kept (all of them unless max_image_len caps it; patch_index says which).
        Head outputs are float32 (the losses' softmax / regression run in float32); the rest is in `dtype`.
        `image_type` is the modality-type id of the image tokens (NLVR2 feeds a second image as 2).
        """
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"ViLT needs batch key {key!r}; got keys {sorted(batch)}")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        deterministic = not train
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        length = text_ids.shape[1]

        # BERT embeddings; the word table is also the tied MLM decoder's weight.
        text, word_table = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=self.type_vocab_size,
            ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            name="text_embeddings")(text_ids, batch.get("text_type_ids"))
        image, image_mask, patch_index = self._embed_image(batch["image"], batch.get("image_mask"),
                                                           batch.get("patch_mask"), train)
        modality = self._param("modality_embedding", layers.embed_init, (None, "embed"),
                               (self.modality_type_vocab, self.width)).astype(self.dtype)
        x = jnp.concatenate([text + modality[0], image + modality[image_type]], axis=1)
        # Sown so tests and analyses can see the encoder input (mutable=["intermediates"]; free otherwise).
        self.sow("intermediates", "embeddings", x)
        x = layers.constrain(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))

        mask = jnp.concatenate([text_mask.astype(jnp.int32), image_mask], axis=1)
        x = layers.tower_encoder(self)(x, layers.padding_bias(mask), deterministic)
        if self.norm == "pre":  # post-LN blocks already end in a LayerNorm
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_final")(x)
        x = layers.constrain(x)
        text_tokens, image_tokens = x[:, :length], x[:, length:]

        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = heads.pooler(x[:, 0], **dt)  # tanh(Dense(text [CLS]))
        out = {
            "text_tokens": text_tokens,
            "image_tokens": image_tokens,
            "pooled": layers.constrain(pooled, layers.POOLED_AXES),
            "image_mask": image_mask,
            "patch_index": patch_index,
            # Hugging Face ViltModel's name for the whole sequence (an extra copy only where a jit returns it whole).
            "last_hidden_state": x,
        }
        out["pooler_output"] = out["pooled"]  # and for the pooled output
        transform = dict(activation=self.activation, ln_epsilon=self.ln_epsilon, **dt)
        if self.mlm_head:
            out["mlm_logits"] = heads.tied_mlm_logits(self, text_tokens, word_table, **transform)
        if self.itm_head:
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.mpp_head:
            # Regresses the raw p*p*C pixels of every kept patch (targets: layers.patchify(image, p), gathered with
            # patch_index; normalise them in the loss if wanted). ViLT's own MPP head instead classifies each
            # patch's mean RGB into 256 bins per channel; a pixel regression is the MAE/BEiT-era default.
            p, c = self.patch_size, batch["image"].shape[-1]
            out["mpp_pred"] = heads.token_prediction(image_tokens[:, 1:], p * p * c, prefix="mpp", **transform)
        if self.vqa_labels is not None:
            # Named vqa_head: HF ViltForQuestionAnswering's classifier maps onto it (mmjax.convert.hf_vilt).
            out["vqa_logits"] = heads.AnswerClassifier(self.vqa_labels, **dt, name="vqa_head")(pooled).astype(
                jnp.float32)
        if self.rank_head:
            out["rank_logits"] = heads.linear_logits(pooled, 1, name="rank_head", **dt)
        hf_heads = [k for k in ("mlm_logits", "vqa_logits", "rank_logits") if k in out]
        if len(hf_heads) == 1 and not self.itm_head and not self.mpp_head:
            # Exactly one Hugging Face head (a converted ViltFor... checkpoint): HF calls its output `logits`.
            out["logits"] = out[hf_heads[0]]
        return out
