"""ODITS, the object-driven image–text similarity model of seed 004 Ch. 3 (notebook 08): the model.

The thesis designs ODITS (§3.1, Fig. 3.1, Table 3.1) but never trains or measures it; this module
builds it on top of a CLIP; :mod:`course_utils.recipes.odits` trains it with the course's loop
and compares it with that CLIP.

Notation (Table 3.1), for image ``i`` with ``K_i`` objects and a vocabulary of ``n`` words::

    E_X ∈ R^d            CLIP_image(X)                       image embedding
    E_M ∈ R^{K_i x d}    CLIP_image(M_j ∘ X), j = 1..K_i     object embeddings
    c   ∈ [0,1]^{K_i}    object confidences (conf)
    E_T ∈ R^{n x d}      CLIP_text(W)                        vocabulary embeddings
    P   ∈ [0,1]^{K_i x n}  softmax_k(s · cos(E_M_j, E_T_k))   object–text similarity matrix
    E^S = P E_T ∈ R^{K_i x d}                                 similarity-weighted text embeddings

The forward pass (:class:`ODITS`):

1. **Self-attention 1** (objects): tokens are the objects; ``Q = K = E^S`` (what each object
   *says*), ``V = c ∘ E_M`` (what each object *looks like*, scaled by its confidence).  The
   outputs are summed over the objects into one vector (the thesis's ``Σ_j``); we divide the sum
   by ``K_i`` so its scale does not grow with the number of objects.  See
   :func:`object_self_attention`.  As in any transformer block the layer is residual: the
   confidence-weighted mean object is added back before a LayerNorm.
2. **Self-attention 2** (image + objects): the thesis writes ``Q = K`` = the previous output and
   ``V = E_X``.  Read literally (one query, one key) the attention weight is always 1 and the
   layer is a plain linear map; we therefore run a residual attention block over the two tokens
   ``[E_X, objects]`` and average them, so the layer learns how image and objects inform each
   other.
3. **Feature enhancer** (GroundingDINO style, :class:`FeatureEnhancerLayer`): image tokens
   ``[image, objects...]`` and the vocabulary attend to each other (image→text and text→image
   cross-attention), so every image gets its own, image-aware word embeddings.
4. **CLIP-style logits**: ``s · cos(image, word)`` with CLIP's learnt temperature ``s = 1/τ``;
   the softmax over the vocabulary is the thesis's word–image probability matrix.

**No objects.** An image with ``K_i = 0`` (SAM found nothing, no boxes) falls back to the image
alone: the object token is masked out of self-attention 2 and the enhancer sees only the image
token, so the output is exactly what the no-object ablation (``use_objects=False``) gives.

**Initialisation (§3.2).** The shared parts (both CLIP towers, the temperature) are copied from a
given CLIP (notebook 07's fine-tuned one); the new layers are initialised with Xavier or Kaiming
uniform from a seeded generator (:func:`init_new_layers_`), and :func:`set_deterministic` sets the
flags of §3.2.

Objects, their features and the training-free baselines are in :mod:`course_utils.clip.objects`;
the training loss and step in :mod:`course_utils.clip.odits_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import module_device, same_device, to_device
from ..env import seed_everything
from .objects import ObjectFeatures

__all__ = [
    "ODITS",
    "CrossAttention",
    "FeatureEnhancerLayer",
    "init_new_layers_",
    "object_self_attention",
    "predict",
    "set_deterministic",
    "similarity_weighted_embeddings",
]


def similarity_weighted_embeddings(object_emb: torch.Tensor, text_emb: torch.Tensor,
                                   logit_scale: float | torch.Tensor = 100.0
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The object–text similarity matrix ``P`` and the similarity-weighted embeddings ``E^S``.

    ``P_jk = softmax_k(s · cos(E_M_j, E_T_k))`` and ``E^S_j = Σ_k P_jk E_T_k`` (§3.1).

    Args:
        object_emb: ``(..., K, d)`` object embeddings (any leading batch dimensions).
        text_emb: ``(n, d)`` vocabulary embeddings, ``n >= 1``.
        logit_scale: ``s = 1/τ`` (a float or a scalar tensor).

    Returns:
        ``(P, E_S)`` of shapes ``(..., K, n)`` and ``(..., K, d)``; every row of ``P`` sums to 1.
        ``E^S`` mixes the *given* text embeddings (not re-normalised).  Both are on the
        accelerator when either input is there (the other is moved to it).
    """
    if not isinstance(object_emb, torch.Tensor) or not isinstance(text_emb, torch.Tensor):
        raise ValueError(f"object_emb and text_emb: expected tensors, got {type(object_emb).__name__} "
                         f"and {type(text_emb).__name__}")
    if text_emb.ndim != 2 or text_emb.shape[0] == 0:
        raise ValueError(f"text_emb: expected a non-empty (n, d) vocabulary, got {tuple(text_emb.shape)}")
    if object_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"object_emb (..., K, {object_emb.shape[-1]}) and text_emb (n, {text_emb.shape[-1]}) "
                         "must have the same embedding size d")
    # a student's objects straight from ObjectFeatures (CPU) meet a vocabulary on the GPU
    object_emb, text_emb = same_device(object_emb, text_emb)
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.to(text_emb.device)
    cos = F.normalize(object_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    P = (logit_scale * cos).softmax(dim=-1)
    return P, P @ text_emb


def object_self_attention(es: torch.Tensor, em: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """Self-attention 1 of ODITS: objects attend to objects, summed into one vector per image.

    ``Q = E^S W_q^T``, ``K = E^S W_k^T`` (the words each object pulls toward decide who attends to
    whom), ``V = (c ∘ E_M) W_v^T`` (confidence-weighted object appearance);
    ``A = softmax(Q K^T / sqrt(d)) V`` over the image's valid objects only, and the output is
    ``(1/K_i) Σ_j A_j`` over its valid objects.

    Args:
        es: ``(B, K, d)`` similarity-weighted text embeddings ``E^S`` (padded).
        em: ``(B, K, d)`` object embeddings ``E_M`` (padded).
        conf: ``(B, K)`` confidences ``c_j``.
        valid: ``(B, K)`` bool, False for padding.
        w_q, w_k, w_v: ``(d, d)`` projection matrices (as ``nn.Linear.weight``: ``y = x W^T``).

    Returns:
        ``(B, d)``; all zeros for an image without valid objects (nothing to attend to).
    """
    d = w_q.shape[0]
    q, k = es @ w_q.T, es @ w_k.T
    v = (conf.unsqueeze(-1) * em) @ w_v.T
    scores = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, K, K)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    # rows of an image without objects are all -inf: softmax would give NaN, so zero them
    attn = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    out = (attn @ v) * valid.unsqueeze(-1)  # (B, K, d), padding rows zeroed
    n = valid.sum(dim=1, keepdim=True).clamp_min(1).to(out.dtype)
    return out.sum(dim=1) / n


def init_new_layers_(modules: Sequence[nn.Module] | nn.Module, scheme: str = "xavier",
                     generator: torch.Generator | None = None) -> None:
    """Initialise ODITS's new layers in place (§3.2), drawing only from ``generator``.

    Every ``nn.Linear`` weight and every ``nn.MultiheadAttention`` input projection gets
    Xavier uniform, ``U(±sqrt(6/(n_in+n_out)))``, or Kaiming uniform, ``U(±sqrt(6/n_in))``;
    biases are set to zero and ``nn.LayerNorm`` to weight 1, bias 0.  Modules are visited in
    ``named_modules`` order, so the same generator state gives the same weights.

    Args:
        modules: the new layers (never the shared CLIP parts: those come from the checkpoint).
        scheme: ``"xavier"`` or ``"kaiming"``.
        generator: a seeded ``torch.Generator``; the global RNG is left untouched.
    """
    if scheme not in ("xavier", "kaiming"):
        raise ValueError(f"init_new_layers_: scheme={scheme!r}, expected 'xavier' or 'kaiming'")
    if isinstance(modules, nn.Module):
        modules = [modules]

    def fill(w: torch.Tensor) -> None:
        if scheme == "xavier":
            nn.init.xavier_uniform_(w, generator=generator)
        else:  # gain sqrt(2) (a=0, ReLU) makes the bound exactly sqrt(6 / n_in)
            nn.init.kaiming_uniform_(w, a=0.0, nonlinearity="relu", generator=generator)

    with torch.no_grad():
        for root in modules:
            for _, m in root.named_modules():
                if isinstance(m, nn.Linear):
                    fill(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.MultiheadAttention):
                    if m.in_proj_weight is not None:
                        fill(m.in_proj_weight)
                    else:
                        for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                            fill(w)
                    if m.in_proj_bias is not None:
                        m.in_proj_bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    if m.weight is not None:
                        m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()


def set_deterministic(seed: int = 0) -> dict[str, bool]:
    """Seed everything and set §3.2's flags; return them so a notebook can print them.

    ``torch.use_deterministic_algorithms(True)`` (``warn_only`` so an op without a deterministic
    kernel warns rather than stops the notebook), ``cudnn.benchmark = False`` and
    ``cudnn.deterministic = True``.
    """
    seed_everything(seed, deterministic=True)
    return {"use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.deterministic": torch.backends.cudnn.deterministic}


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens (no residual, no norm).

    Either side may be shared by the whole batch (2-D ``(L, d)``): its projection is then
    computed once.  When the queries far outnumber the keys (a vocabulary of thousands of words
    attending to a few image tokens) the output projection is applied to the values before the
    attention sum, which is the same linear map but costs ``B·L_k·d²`` instead of ``B·L_q·d²``.
    """

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads = dim, heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` or ``(L, d)`` → ``(B|1, h, L, d/h)``."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``query`` ``(B, L_q, d)`` or ``(L_q, d)``; ``context`` ``(B, L_k, d)`` or ``(L_k, d)``;
        ``context_valid`` ``(B, L_k)`` bool (False = padding).  Returns ``(B, L_q, d)``."""
        q, k = self._split(self.q(query)), self._split(self.k(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dim // self.heads)  # (B, h, L_q, L_k)
        if context_valid is not None:
            scores = scores.masked_fill(~context_valid[:, None, None, :], float("-inf"))
        attn = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
        v = self._split(self.v(context))  # (B|1, h, L_k, d/h)
        L_q, L_k = attn.shape[-2], attn.shape[-1]
        if L_q > 4 * L_k:
            # fold W_o into the values: o(concat_h A_h V_h) = Σ_h A_h (V_h W_o,h^T), and do the
            # sum over heads and keys as one matmul so no (B, h, L_q, d) tensor is ever made
            w_o = self.o.weight.view(self.dim, self.heads, self.dim // self.heads).permute(1, 2, 0)
            vo = (v @ w_o).expand(attn.shape[0], -1, -1, -1)  # (B, h, L_k, d)
            B, h = attn.shape[:2]
            out = attn.permute(0, 2, 1, 3).reshape(B, L_q, h * L_k) @ vo.reshape(B, h * L_k, self.dim)
            out = out + self.o.bias  # (B, L_q, d)
        else:
            out = attn @ v  # (B, h, L_q, d/h)
            out = self.o(out.transpose(1, 2).reshape(out.shape[0], L_q, self.dim))
        return out


class FeatureEnhancerLayer(nn.Module):
    """One GroundingDINO-style feature-enhancer layer: image tokens ↔ vocabulary.

    Image tokens first attend to each other (GroundingDINO uses deformable attention over a
    feature map; ODITS has a handful of tokens, so plain self-attention), then both directions of
    cross-attention run on the same inputs: image→text updates the image tokens, text→image gives
    every image its own copy of the vocabulary, followed by an FFN on the image tokens.  Text
    self-attention and the text FFN of GroundingDINO are left out: the vocabulary is a set of
    independent words (no sentence to contextualise), and an FFN on ``B x n`` word tokens would
    dominate the cost for thousands of words.
    """

    def __init__(self, dim: int, heads: int = 4, ff_mult: int = 2) -> None:
        super().__init__()
        self.self_attn = CrossAttention(dim, heads)
        self.image_to_text = CrossAttention(dim, heads)
        self.text_to_image = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.norm_self, self.norm_img, self.norm_ffn, self.norm_txt = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, image_tokens: torch.Tensor, image_valid: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``image_tokens`` ``(B, L, d)``, ``image_valid`` ``(B, L)`` bool, ``text`` ``(n, d)``.

        Returns:
            ``(image_tokens (B, L, d), text (B, n, d))``, both updated.
        """
        x = self.norm_self(image_tokens + self.self_attn(image_tokens, image_tokens, image_valid))
        img = self.norm_img(x + self.image_to_text(x, text))
        txt = self.norm_txt(text.unsqueeze(0) + self.text_to_image(text, x, image_valid))
        img = self.norm_ffn(img + self.ffn(img))
        return img, txt


class ODITS(nn.Module):
    """Object-Driven Image and Text Similarity (seed 004 §3.1, Fig. 3.1).

    Args:
        clip: the CLIP to build on (open_clip ``CLIP``; notebook 07's fine-tuned one).  Its two
            towers and its temperature are the *shared* parts; pass a copy if the original must
            stay untouched by training.
        heads: attention heads of self-attention 2 and the enhancer (self-attention 1 is the
            single-head layer of :func:`object_self_attention`).
        ff_mult: hidden width of the enhancer's FFN, in multiples of ``d``.
        init: ``"xavier"`` or ``"kaiming"`` for the new layers.
        seed: seeds the new layers' initialisation (same seed, same weights).
        use_objects: ``False`` is the ablation without objects (image + vocabulary only).
        freeze_clip: keep the shared parts fixed (no gradients): the ``cpu`` profile trains only
            the new layers, on embeddings computed once.
        similarity_fn, attention_fn, init_fn: replacements for :func:`similarity_weighted_embeddings`,
            :func:`object_self_attention` and :func:`init_new_layers_` with the same signatures
            (notebook 08 passes the student's, once checked).

    Attributes:
        embed_dim: ``d``.
    """

    def __init__(self, clip: nn.Module, *, heads: int = 4, ff_mult: int = 2, init: str = "xavier",
                 seed: int = 0, use_objects: bool = True, freeze_clip: bool = True,
                 similarity_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                 attention_fn: Callable[..., torch.Tensor] | None = None,
                 init_fn: Callable[..., None] | None = None) -> None:
        super().__init__()
        self.clip = clip
        # the notebook plugs in the student's versions (checked against these defaults first)
        self.similarity_fn = similarity_fn or similarity_weighted_embeddings
        self.attention_fn = attention_fn or object_self_attention
        d = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.embed_dim)
        self.embed_dim = d
        self.use_objects = use_objects
        self.freeze_clip = freeze_clip
        # the temperature is shared with CLIP: start from its value, learn it further
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone().float())
        # P^(i) is "computed using CLIP" (§3.1): CLIP's temperature, fixed
        self.register_buffer("object_logit_scale", clip.logit_scale.detach().exp().float().clone())
        with torch.random.fork_rng():  # module constructors draw from the global RNG: keep it clean
            torch.manual_seed(seed)
            self.sa1_q, self.sa1_k, self.sa1_v = (nn.Linear(d, d, bias=False) for _ in range(3))
            self.sa1_out = nn.Linear(d, d)
            self.norm_sa1 = nn.LayerNorm(d)
            self.sa2 = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm_sa2 = nn.LayerNorm(d)
            self.enhancer = FeatureEnhancerLayer(d, heads, ff_mult)
        self.init_scheme = init
        (init_fn or init_new_layers_)(self.new_modules(), init, torch.Generator().manual_seed(seed))
        if freeze_clip:
            for p in self.clip.parameters():
                p.requires_grad_(False)
        self.register_buffer("text_emb", torch.zeros(0, d), persistent=False)
        self.vocabulary: list[str] = []
        # the new layers were built (and initialised, from a CPU generator) on the CPU: put them
        # where the CLIP is, so that ODITS on a GPU CLIP is one model on one device
        self.to(module_device(clip))

    # ---------------------------------------------------------------- parts and vocabulary
    def new_modules(self) -> list[nn.Module]:
        """The layers ODITS adds to CLIP (initialised by :func:`init_new_layers_`)."""
        return [self.sa1_q, self.sa1_k, self.sa1_v, self.sa1_out, self.norm_sa1, self.sa2, self.norm_sa2,
                self.enhancer]

    def shared_parameter_names(self) -> list[str]:
        """Names of the parameters copied from CLIP (``clip.*`` and ``logit_scale``)."""
        return [n for n, _ in self.named_parameters() if n.startswith("clip.") or n == "logit_scale"]

    def set_vocabulary(self, words: Sequence[str], text_emb: torch.Tensor | None = None,
                       tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None) -> None:
        """Fix the vocabulary ``W`` and its embeddings ``E_T`` ``(n, d)``.

        Pass ``text_emb`` (precomputed, L2-normalised) or a ``tokenizer`` (encoded here with the
        shared text tower).

        Raises:
            ValueError: an empty vocabulary, or embeddings that do not match it.
        """
        words = list(words)
        if not words:
            raise ValueError("ODITS.set_vocabulary: the vocabulary is empty; ODITS scores images "
                             "against words, so it needs at least one word")
        if text_emb is None:
            if tokenizer is None:
                raise ValueError("ODITS.set_vocabulary: pass text_emb=(n, d) or a tokenizer")
            with torch.no_grad():
                dev = self.logit_scale.device
                text_emb = F.normalize(self.clip.encode_text(tokenizer(words).to(dev)).float(), dim=-1)
        if not isinstance(text_emb, torch.Tensor) or text_emb.shape != (len(words), self.embed_dim):
            raise ValueError(f"ODITS.set_vocabulary: text_emb has shape "
                             f"{tuple(text_emb.shape) if isinstance(text_emb, torch.Tensor) else type(text_emb).__name__}, "
                             f"expected ({len(words)}, {self.embed_dim})")
        self.vocabulary = words
        self.text_emb = text_emb.detach().float().to(self.logit_scale.device)

    # ---------------------------------------------------------------- forward
    def forward(self, image_emb: torch.Tensor, object_emb: torch.Tensor, conf: torch.Tensor,
                valid: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Word logits for a batch of images.

        Every input may be on the CPU (features from :class:`course_utils.clip.objects.ObjectFeatures`)
        or on the model's device; all are moved to the model's device.

        Args:
            image_emb: ``(B, d)`` ``E_X``.
            object_emb: ``(B, K, d)`` ``E_M``, zero-padded to the batch's largest ``K`` (``K`` may be 0).
            conf: ``(B, K)`` confidences; valid: ``(B, K)`` bool, False for padding.
            text_emb: ``(n, d)`` ``E_T``; default the vocabulary of :meth:`set_vocabulary`.

        Returns:
            ``{"logits": (B, n), "object_text": (B, K, n) P^(i), "image": (B, d) fused image
            embedding (L2-normalised), "has_objects": (B,) bool}``, on the model's device.
        """
        for name, t in (("image_emb", image_emb), ("object_emb", object_emb), ("conf", conf), ("valid", valid)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"ODITS: {name} must be a tensor, got {type(t).__name__}")
        E_T = self.text_emb if text_emb is None else text_emb
        if not isinstance(E_T, torch.Tensor) or E_T.ndim != 2 or E_T.shape[0] == 0:
            raise ValueError("ODITS: the vocabulary is empty (call set_vocabulary with at least one word)")
        if image_emb.ndim != 2:
            raise ValueError(f"ODITS: image_emb must be (B, d), got {tuple(image_emb.shape)}")
        image_emb, object_emb, conf, valid, E_T = to_device((image_emb, object_emb, conf, valid, E_T),
                                                            self.logit_scale.device)
        B, d = image_emb.shape
        if object_emb.shape[0] != B or object_emb.shape[-1] != d or object_emb.ndim != 3:
            raise ValueError(f"ODITS: object_emb must be (B={B}, K, d={d}), got {tuple(object_emb.shape)}")
        if conf.shape != object_emb.shape[:2] or valid.shape != object_emb.shape[:2]:
            raise ValueError(f"ODITS: conf {tuple(conf.shape)} and valid {tuple(valid.shape)} must both be "
                             f"(B, K) = {tuple(object_emb.shape[:2])}")
        valid = valid.bool() if self.use_objects else torch.zeros_like(valid, dtype=torch.bool)
        has_obj = valid.any(dim=1)
        # CLIP's unit-norm embeddings have components of size ~1/sqrt(d), the LayerNorm'd outputs
        # of the new layers ~1: rescale the inputs by sqrt(d) so residual sums mix comparable
        # sizes (otherwise the first residual branch drowns the word identities).  Cosine logits
        # and P^(i) do not depend on this scale.
        s = math.sqrt(d)
        image_emb, object_emb, E_T = s * image_emb, s * object_emb, s * E_T

        # object-text similarity and self-attention 1 (objects → one vector)
        P, E_S = self.similarity_fn(object_emb, E_T, self.object_logit_scale)
        pooled = self.attention_fn(E_S, object_emb, conf, valid, self.sa1_q.weight,
                                   self.sa1_k.weight, self.sa1_v.weight)
        # residual, as in any transformer block: the pooled values' input (the confidence-
        # weighted mean object) plus what attention adds.  Without it the objects would reach the
        # output only through freshly initialised projections, which 100 training images cannot
        # align with CLIP's word space for words never seen in training.
        n_obj = valid.sum(dim=1, keepdim=True).clamp_min(1).to(object_emb.dtype)
        mean_obj = (conf.unsqueeze(-1) * object_emb * valid.unsqueeze(-1)).sum(dim=1) / n_obj
        objects = self.norm_sa1(mean_obj + self.sa1_out(pooled)) * has_obj[:, None]

        # self-attention 2: a transformer block over the tokens [image, objects] (the object
        # token is masked out when there is none); the fused image is the mean of its tokens
        tokens = torch.stack([image_emb, objects], dim=1)  # (B, 2, d)
        pad = torch.stack([torch.zeros_like(has_obj), ~has_obj], dim=1)  # True = ignore
        mixed, _ = self.sa2(tokens, tokens, tokens, key_padding_mask=pad, need_weights=False)
        z2 = self.norm_sa2(tokens + mixed)
        fused = torch.where(has_obj[:, None], z2.mean(dim=1), z2[:, 0])

        # feature enhancer: [fused image, objects...] ↔ vocabulary
        img_tokens = torch.cat([fused.unsqueeze(1), object_emb], dim=1)
        img_valid = torch.cat([torch.ones_like(has_obj).unsqueeze(1), valid], dim=1)
        img, txt = self.enhancer(img_tokens, img_valid, E_T)

        z = F.normalize(img[:, 0], dim=-1)
        t = F.normalize(txt, dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * torch.einsum("bd,bnd->bn", z, t)
        return {"logits": logits, "object_text": P, "image": z, "has_objects": has_obj}

    def embed(self, images: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels → embeddings with the shared image tower (end-to-end training in ``full``).

        Args: ``images`` ``(B, 3, H, W)``; ``objects`` ``(B, K, 3, H, W)`` preprocessed crops, on
        any device (moved to the model's).
        Returns: ``(E_X (B, d), E_M (B, K, d))``, L2-normalised, on the model's device.
        """
        if images.ndim != 4 or objects.ndim != 5 or objects.shape[0] != images.shape[0]:
            raise ValueError(f"ODITS.embed: expected images (B, 3, H, W) and objects (B, K, 3, H, W), got "
                             f"{tuple(images.shape)} and {tuple(objects.shape)}")
        images, objects = to_device((images, objects), self.logit_scale.device)
        B, K = objects.shape[:2]
        e_x = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        if K == 0:
            return e_x, e_x.new_zeros(B, 0, self.embed_dim)
        e_m = F.normalize(self.clip.encode_image(objects.flatten(0, 1)).float(), dim=-1)
        return e_x, e_m.view(B, K, -1)


@torch.no_grad()
def predict(model: ODITS, feats: ObjectFeatures, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """ODITS's word probabilities ``P`` ``(N, n)`` (softmax over the vocabulary) and ``P^(i)``.

    ``feats`` may live on the CPU (as :func:`course_utils.clip.objects.extract_object_features`
    returns them); each batch goes to the model's device, and the results come back to the CPU
    for metrics and figures.

    Returns ``{"P": (N, n), "object_text": (N, K_max, n)}``, on the CPU.
    """
    if not isinstance(model, ODITS):
        raise TypeError(f"predict: model must be an ODITS, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be at least 1, got {batch_size}")
    was = model.training
    model.eval()
    Ps, Os = [], []
    for s in range(0, len(feats), batch_size):
        sl = slice(s, s + batch_size)
        # ODITS.forward moves each batch to the model's device
        out = model(feats.image_emb[sl], feats.object_emb[sl], feats.conf[sl], feats.valid[sl])
        Ps.append(out["logits"].softmax(dim=-1).cpu())
        Os.append(out["object_text"].cpu())
    model.train(was)
    return {"P": torch.cat(Ps), "object_text": torch.cat(Os)}
