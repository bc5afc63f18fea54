"""T5 in pure JAX: the frozen encoder-decoder that SPoT tunes a prompt for (Vu et al. 2022 §2.1).

Read top to bottom. The model (Raffel et al. 2020 §2.1; SPoT freezes T5 1.1 LM-adapted): T5Config, rms_norm,
relpos_bias, dropout, _attend, _mlp; prepend_prompt (Lester et al. 2021 §2: the prompt [P; X]) and encode;
decode, forward; greedy_decode and score_targets for evaluation. Then three headed sections: a performance
trick (the absorbed cross-attention: the plain formula, then its measured gain); parameters (init_params,
param_count); Hugging Face checkpoints (load_checkpoint: safetensors / pytorch_model.bin -> T5X names).
Params: nested dicts with T5X checkpoint names; attention kernels [D,N,H] (query/key/value), [N,H,D] (out).
"""
import dataclasses
import functools
import json
import math
import pickle
import re
import zipfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from data import EOS_ID, PAD_ID  # T5's ids; the decoder starts from PAD (HF decoder_start_token_id=0)

NEG_INF = -1e9  # additive attention mask; softmax runs in float32, so this underflows to exactly 0


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # 32000 SentencePiece pieces + 100 sentinels, padded to 32128 (T5X, HF configs)
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    relative_attention_num_buckets: int = 32  # Raffel et al. 2020 §2.1
    relative_attention_max_distance: int = 128  # Raffel et al. 2020 §2.1
    gated_gelu: bool = True  # True: T5 1.1 gated-GELU FFN; False: T5 1.0 ReLU FFN
    tie_word_embeddings: bool = False  # T5 1.0: output layer = embedding (x d_model^-0.5); T5 1.1: its own
    dropout_rate: float = 0.1  # Vu et al. 2022 §2.1.4; t5x/configs/runs/finetune.gin DROPOUT_RATE
    layer_norm_epsilon: float = 1e-6
    name: str = "google/t5-base-lm-adapt"
    # Execution only: the same numbers either way (a run may change them on resume). How the layers run, as
    # flaxformer's scan_layers / layer_remat: under lax.scan, one compiled layer whatever the depth; remat
    # (training) keeps only each layer's input for the backward pass ('layer'), or also the matmuls against
    # the weights ('dots'), and recomputes the rest: memory for compute (spot.py plan picks it).
    remat: str = "none"
    scan_layers: bool = True  # False: the layers unrolled (one copy of the layer per depth in the program)

    @classmethod
    def from_name(cls, name):
        """The shape of google/t5-{size}-lm-adapt, google/t5-v1_1-{size} or (google-t5/)t5-{size}."""
        n = name.lower().removeprefix("google-t5/")
        m = re.fullmatch(r"google/t5-(?:v1_1-)?(small|base|large|xl|xxl)(-lm-adapt)?", n)
        if m and (m.group(2) is None) == ("v1_1" in n):
            return cls(*_V1_1[m.group(1)], gated_gelu=True, tie_word_embeddings=False, name=name)
        m = re.fullmatch(r"t5-(small|base|large|3b|11b)", n)
        if m:
            return cls(*_V1_0[m.group(1)], gated_gelu=False, tie_word_embeddings=True, name=name)
        raise ValueError(f"unknown T5 name {name!r}; known: {', '.join(KNOWN_NAMES)}")

    @classmethod
    def tiny(cls, **overrides):
        """A tiny random T5 1.1 for tests and --tiny runs."""
        base = dict(d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2, num_decoder_layers=2, name="tiny")
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf(cls, c, where="config.json"):
        """From a Hugging Face config.json dict (model_type t5 or mt5); `where` names the file in errors."""
        return _config_from_hf(cls, c, where)  # in the checkpoints section


# (vocab, d_model, d_kv, d_ff, heads, encoder layers, decoder layers): the hub's config.json files
# (google/t5-v1_1-*, google-t5/t5-*); T5 1.1 also in t5x/examples/t5/t5_1_1/{small,base,large,xl,xxl}.gin.
_V1_1 = {s: (32128, d, 64, f, n, L, L) for s, d, f, n, L in [
    ("small", 512, 1024, 6, 8), ("base", 768, 2048, 12, 12), ("large", 1024, 2816, 16, 24),
    ("xl", 2048, 5120, 32, 24), ("xxl", 4096, 10240, 64, 24)]}
_V1_0 = {s: (32128, d, h, f, n, L, L) for s, d, h, f, n, L in [
    ("small", 512, 64, 2048, 8, 6), ("base", 768, 64, 3072, 12, 12), ("large", 1024, 64, 4096, 16, 24),
    ("3b", 1024, 128, 16384, 32, 24), ("11b", 1024, 128, 65536, 128, 24)]}
KNOWN_NAMES = ([f"google/t5-{s}-lm-adapt" for s in _V1_1] + [f"google/t5-v1_1-{s}" for s in _V1_1]
               + [f"t5-{s}" for s in _V1_0])


# ======================================================================= the model (Raffel et al. 2020 §2.1)
def rms_norm(x, scale, eps=1e-6):
    """T5 LayerNorm = RMSNorm: rescale only, no mean subtraction, no bias. float32 inside."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale


@functools.partial(jax.jit, static_argnames=("bidirectional", "num_buckets", "max_distance"))
def relpos_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    """The bucket of rel = key_pos - query_pos: exact below num_buckets/2 (/4 if bidirectional), log-spaced up
    to max_distance, then clipped. Bidirectional keeps half the buckets for rel > 0. Example (32 buckets,
    128): bidirectional -1 -> 1, +1 -> 17, -200 -> 15; causal -3 -> 3, -200 -> 31, +5 -> 0."""
    rel = jnp.asarray(rel, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset, d = jnp.where(rel > 0, num_buckets, 0), jnp.abs(rel)
    else:  # decoder: only the past (rel <= 0) is visible
        offset, d = 0, jnp.maximum(-rel, 0)
    exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(d, 1).astype(jnp.float32) / exact) / np.log(max_distance / exact)
    large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32), num_buckets - 1)
    return offset + jnp.where(d < exact, d, large)


def relpos_bias(table, q_len, k_len, bidirectional, cfg):
    """table [N,K] -> bias [1,N,T,S]. One table per stack, shared by all of its layers."""
    rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
    buckets = relpos_bucket(rel, bidirectional, cfg.relative_attention_num_buckets,
                            cfg.relative_attention_max_distance)
    return table[:, buckets][None].astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec, a, b):
    """einsum with a float32 result (attention logits, output logits) from operands of any dtype. Its
    gradient multiplies in the operands' dtype: plain autodiff would cast a bfloat16 weight to float32 to meet
    the float32 cotangent, a float32 copy of the weight and a float32 matmul in every backward pass."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


einsum_f32.defvjp(lambda spec, a, b: (einsum_f32(spec, a, b), (a, b)),
                  lambda s, ab, g: jax.vjp(functools.partial(jnp.einsum, s), *ab)[1](g.astype(ab[0].dtype)))


def _dropout(x, site, seed, rate, mask_shape=None):
    """Inverted dropout; identity when seed is None. mask_shape (broadcastable to x) shares a mask along its
    size-1 axes. Default: one mask per (batch, feature), shared by every position of the length axis -2, as in
    the flaxformer T5 1.1 that SPoT's code runs (google-research/prompt-tuning
    configs/architectures/t5_1_1_flaxformer.gin: linen.Dropout broadcast_dims=(-2,)); HF T5 draws every
    element (mask_shape=x.shape). `seed` [B]: one uint32 per example, so an example's masks do not depend on
    its batch. keep = mix32(index ^ mix32(seed_b ^ crc32(site))) >= rate * 2^32, a counter-based hash: a few
    integer ops per element, not a threefry draw per site (Base step: 11.9 s with threefry, 9.0 s hashed)."""
    if seed is None or rate == 0.0:
        return x
    shape = (*x.shape[:-2], 1, x.shape[-1]) if mask_shape is None else tuple(mask_shape)
    site_seed = _mix32(seed ^ jnp.uint32(zlib.crc32(site.encode()))).reshape(-1, *[1] * (len(shape) - 1))
    # An element's index in its example's mask: its row (flat over the axes between batch and last; < 2^16)
    # times 2^16 plus its place on the last axis (<= 2^16), not the flat index, so that a longer last axis
    # (an input padded to a longer bucket: runs that share a step) leaves every other mask bit as it was.
    rows, last = int(np.prod(shape[1:-1])), shape[-1]
    index = jax.lax.iota(jnp.uint32, rows)[:, None] * jnp.uint32(2 ** 16) + jax.lax.iota(jnp.uint32, last)
    h = _mix32(index.reshape(1, *shape[1:]) ^ site_seed)
    keep = h >= jnp.uint32(round(rate * 2 ** 32))  # P(keep) = 1 - rate to within 2^-32
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _mix32(h):
    """murmur3's 32-bit finaliser: a bijection on uint32 whose output bits each depend on every input bit."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _dropout_seeds(dropout_key, batch_size):
    """dropout_key: None (no dropout), or a PRNG key array, one key (split into one per example) or [B] keys
    -> one uint32 seed per example [B], or None."""
    if dropout_key is None:
        return None
    keys = jax.random.split(dropout_key, batch_size) if dropout_key.ndim == 0 else dropout_key
    return jax.vmap(lambda k: jax.random.bits(k, dtype=jnp.uint32))(keys)


def _project(p, x, names):
    """x [B,S,D] -> one [B,N,S,H] array per kernel name: einsum("BSD,DNH->BNSH") as one 2-D matmul per kernel
    ([D,N,H] is [D,N*H] for free), heads-major so that both attention einsums are batched matmuls over (B,N).
    A stacked q/k/v einsum made XLA:CPU copy every frozen kernel on every step (~13% of the Small step)."""
    B, S, D = x.shape
    return [(x.reshape(B * S, D) @ p[n]["kernel"].reshape(D, -1)).reshape(B, S, *p[n]["kernel"].shape[1:])
            .transpose(0, 2, 1, 3) for n in names]


def _attend(p, q, k, v, bias, drop, site):
    """softmax(q k^T + bias) v: q [B,N,T,H], k/v [B,N,S,H] (from _project), bias broadcastable to [B,N,T,S]
    -> [B,T,D]. No 1/sqrt(H): Mesh TF T5 folds that factor into the initialisation of `query`."""
    logits = einsum_f32("BNTH,BNSH->BNTS", q, k) + bias
    probs = _attention_probs(logits, drop, site)
    return _attention_out(p, jnp.einsum("BNTS,BNSH->BNTH", probs.astype(v.dtype), v))


def _attention_probs(logits, drop, site):
    probs = jax.nn.softmax(logits, axis=-1)  # float32 even for bfloat16 params
    # Dropout as in T5X/flaxformer: one mask per (batch, head, key), shared by all queries.
    return drop(probs, site + "/probs", mask_shape=(*probs.shape[:2], 1, probs.shape[3]))


def _attention_out(p, out):
    """Per-head outputs [B,N,T,H] -> [B,T,D]: einsum("BNTH,NHD->BTD", out, W_o) as a 2-D matmul."""
    B, N, T, H = out.shape
    out = out.transpose(0, 2, 1, 3).reshape(B * T, N * H)
    return (out @ p["out"]["kernel"].reshape(N * H, -1)).reshape(B, T, -1)


def _mlp(p, x, cfg, drop, site):
    if cfg.gated_gelu:  # T5 1.1: wo(gelu(wi_0 x) * wi_1 x), tanh-approximate GELU (HF "gelu_new")
        h = jax.nn.gelu(x @ p["wi_0"]["kernel"], approximate=True) * (x @ p["wi_1"]["kernel"])
    else:  # T5 1.0: wo(relu(wi x))
        h = jax.nn.relu(x @ p["wi"]["kernel"])
    return drop(h, site + "/hidden") @ p["wo"]["kernel"]


def _embed(params, ids):
    return jnp.take(params["token_embedder"]["embedding"], ids, axis=0)  # T5 does not scale embeddings


def prepend_prompt(prompt, x, mask):
    """Lester et al. 2021 §2: the encoder reads [P_e; X_e]. prompt [P,D] (or [B,P,D]: one per example, a
    batch that mixes tasks), embedded input x [B,S,D] and its mask [B,S] -> [B,P+S,D] and [B,P+S]: prompt
    positions are never masked."""
    B, P = x.shape[0], prompt.shape[-2]
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (B, *prompt.shape[-2:])), x], axis=1)
    return x, jnp.concatenate([jnp.ones((B, P), bool), mask], axis=1)


def _scan_layers(layer, x, per_layer, cfg, seed=None):
    """x through the layers whose weights (and any per-layer inputs) are stacked on axis 0 of `per_layer`:
    layer(x, per_layer[i], seed_i) -> (x, y_i); returns (x, the y_i stacked). The plain form is a Python
    loop, `for i in range(L): x, y[i] = layer(x, per_layer[i], seed_i)`: lax.scan runs the same loop with one
    compiled copy of the layer, so the program and its compile time do not grow with depth (cfg.scan_layers
    False unrolls it). cfg.remat wraps the layer in jax.checkpoint: the backward pass recomputes what it did
    not save. seed: the examples' dropout seeds [B] (None: no dropout), made distinct per layer."""
    L = jax.tree.leaves(per_layer)[0].shape[0]
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)

    def body(x, xs):
        p, i = xs
        return layer(x, p, None if seed is None else _mix32(seed ^ _mix32(i + jnp.uint32(1))))
    layer_ids = jnp.arange(L, dtype=jnp.uint32)
    return jax.lax.scan(body, x, (per_layer, layer_ids), unroll=1 if cfg.scan_layers else L)


REMAT_POLICIES = {"layer": None,  # save nothing inside a layer: its input is the scan's carry
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _encoder_layer(p, x, bias, cfg, seed):
    """Pre-norm residual blocks: x + Attention(LN(x)), then x + MLP(LN(x)). x [B,S,D]."""
    drop = functools.partial(_dropout, seed=seed, rate=cfg.dropout_rate)
    h = rms_norm(x, p["pre_attention_layer_norm"]["scale"], cfg.layer_norm_epsilon)
    q, k, v = _project(p["attention"], h, ("query", "key", "value"))
    x = x + drop(_attend(p["attention"], q, k, v, bias, drop, "encoder/attention"), "encoder/attention")
    h = rms_norm(x, p["pre_mlp_layer_norm"]["scale"], cfg.layer_norm_epsilon)
    return x + drop(_mlp(p["mlp"], h, cfg, drop, "encoder/mlp"), "encoder/mlp")


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode(params, cfg, input_ids, prompt=None, dropout_key=None):
    """input_ids [B,S] (pad 0), prompt [P,D], [B,P,D] (one per example) or None -> (encoded [B,P+S,D], mask
    [B,P+S] bool)."""
    x, mask = _embed(params, input_ids), input_ids != PAD_ID
    if prompt is not None:
        x, mask = prepend_prompt(prompt, x, mask)
    seed = _dropout_seeds(dropout_key, input_ids.shape[0])
    drop = functools.partial(_dropout, seed=seed, rate=cfg.dropout_rate)
    # The prompt joins before the input dropout, as in google-research/prompt-tuning
    # prompt_tuning/train/layers.py (PromptEncoder.embed_and_combine_inputs).
    x = drop(x, "encoder/embedding")
    enc = params["encoder"]
    bias = relpos_bias(enc["relpos_bias"]["rel_embedding"], x.shape[1], x.shape[1], True, cfg)
    bias = bias + jnp.where(mask, 0.0, NEG_INF)[:, None, None, :]
    def layer(x, p, seed):
        return _encoder_layer(p, x, bias, cfg, seed), None
    x, _ = _scan_layers(layer, x, enc["layers"], cfg, seed)
    x = rms_norm(x, enc["encoder_norm"]["scale"], cfg.layer_norm_epsilon)
    return drop(x, "encoder/output"), mask


def _decoder_layer(p, x, encoded, cross_kv, self_bias, cross_bias, cfg, seed, cache=None, t=None):
    """Pre-norm self-attention, cross-attention and MLP blocks. Cross-attention reads encoded [B,S,D] through
    cross_kv = (keys, values), or directly when it is None (_attend_encoded). With `cache` (greedy_decode), x
    is position t: its key/value go into slot t of the cached [B,N,T,H]; self_bias masks later slots."""
    drop = functools.partial(_dropout, seed=seed, rate=cfg.dropout_rate)
    h = rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.layer_norm_epsilon)
    q, k, v = _project(p["self_attention"], h, ("query", "key", "value"))
    if cache is not None:
        k, v = (jax.lax.dynamic_update_slice_in_dim(c, new, t, axis=2) for c, new in zip(cache, (k, v)))
    x = x + drop(_attend(p["self_attention"], q, k, v, self_bias, drop, "decoder/self"), "decoder/self")
    h = rms_norm(x, p["pre_cross_attention_layer_norm"]["scale"], cfg.layer_norm_epsilon)
    pc = p["encoder_decoder_attention"]
    (q,) = _project(pc, h, ("query",))
    # Cross-attention has no position bias; it sees all P+S encoder positions except padding.
    y = (_attend_encoded(pc, q, encoded, cross_bias, drop, "decoder/cross") if cross_kv is None
         else _attend(pc, q, *cross_kv, cross_bias, drop, "decoder/cross"))
    x = x + drop(y, "decoder/cross")
    h = rms_norm(x, p["pre_mlp_layer_norm"]["scale"], cfg.layer_norm_epsilon)
    return x + drop(_mlp(p["mlp"], h, cfg, drop, "decoder/mlp"), "decoder/mlp"), (k, v)


def _logits(params, cfg, x):
    """Final decoder states [B,T,D] -> float32 logits [B,T,V]."""
    if cfg.tie_word_embeddings:  # T5 1.0: output layer = embedding^T, after x * d_model^-0.5 (Mesh TF)
        x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
        return einsum_f32("BTD,VD->BTV", x, params["token_embedder"]["embedding"])
    return einsum_f32("BTD,DV->BTV", x, params["decoder"]["logits_dense"]["kernel"])  # T5 1.1: unscaled


def _decoder_biases(params, cfg, encoder_mask, T):
    """Self-attention: relpos + causal mask [1,N,T,T]; cross-attention: the encoder's padding [B,1,1,S]."""
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    table = params["decoder"]["relpos_bias"]["rel_embedding"]
    self_bias = relpos_bias(table, T, T, False, cfg) + jnp.where(causal, 0.0, NEG_INF)
    return self_bias, jnp.where(encoder_mask, 0.0, NEG_INF)[:, None, None, :]


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode(params, cfg, encoded, encoder_mask, decoder_input_ids, dropout_key=None):
    """encoded [B,S,D], encoder_mask [B,S], decoder_input_ids [B,T] -> logits [B,T,V] float32."""
    seed, T = _dropout_seeds(dropout_key, encoded.shape[0]), decoder_input_ids.shape[1]
    dec, drop = params["decoder"], functools.partial(_dropout, seed=seed, rate=cfg.dropout_rate)
    x = drop(_embed(params, decoder_input_ids), "decoder/embedding")
    self_bias, cross_bias = _decoder_biases(params, cfg, encoder_mask, T)

    def layer(x, per_layer, seed):
        p, kv = per_layer
        return _decoder_layer(p, x, encoded, kv, self_bias, cross_bias, cfg, seed)[0], None
    x, _ = _scan_layers(layer, x, (dec["layers"], _cross_kv(params, cfg, encoded, T)), cfg, seed)
    x = drop(rms_norm(x, dec["decoder_norm"]["scale"], cfg.layer_norm_epsilon), "decoder/output")
    return _logits(params, cfg, x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params, cfg, input_ids, decoder_input_ids, prompt=None, dropout_key=None):
    """input_ids [B,S], decoder_input_ids [B,T], prompt [P,D] or None -> logits [B,T,V] float32.
    dropout_key None = evaluation; a PRNG key (or [B] keys, one per example) = training with
    cfg.dropout_rate (sites are named, so one key serves)."""
    encoded, mask = encode(params, cfg, input_ids, prompt, dropout_key)
    return decode(params, cfg, encoded, mask, decoder_input_ids, dropout_key)


def shift_right(targets):
    """Decoder inputs = targets shifted right, starting with the pad id 0. Example: [[5,6,1]] -> [[0,5,6]]."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], PAD_ID), targets[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_targets(params, cfg, input_ids, targets, prompt=None):
    """Summed log-likelihood [B] float32 of the non-pad tokens of targets [B,T] (rank classification)."""
    logp = jax.nn.log_softmax(forward(params, cfg, input_ids, shift_right(targets), prompt), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != PAD_ID, token_logp, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def greedy_decode(params, cfg, input_ids, prompt=None, max_len=16):
    """Greedy decoding -> int32 [B, max_len]: tokens up to and including EOS, 0 after it. The encoder and the
    cross-attention keys/values (_cross_kv) are computed once; self-attention keys/values live in a
    [B,N,max_len,H] cache per layer; a while_loop emits one token a step until every row is done."""
    encoded, mask = encode(params, cfg, input_ids, prompt)
    dec, B = params["decoder"], input_ids.shape[0]
    cross_kv = _cross_kv(params, cfg, encoded, max_len)  # max_len steps of one query cost as max_len queries
    self_bias, cross_bias = _decoder_biases(params, cfg, mask, max_len)

    def step(state):
        t, token, caches, out, done = state
        x = _embed(params, token)[:, None, :]  # [B,1,D]
        bias_t = jax.lax.dynamic_slice_in_dim(self_bias, t, 1, axis=2)  # query row t: [1,N,1,max_len]

        def layer(x, per_layer, seed):
            p, kv, cache = per_layer
            return _decoder_layer(p, x, encoded, kv, bias_t, cross_bias, cfg, seed, cache, t)
        x, caches = _scan_layers(layer, x, (dec["layers"], cross_kv, caches), cfg)
        x = rms_norm(x, dec["decoder_norm"]["scale"], cfg.layer_norm_epsilon)
        token = jnp.where(done, PAD_ID, jnp.argmax(_logits(params, cfg, x)[:, 0], axis=-1).astype(jnp.int32))
        return t + 1, token, caches, out.at[:, t].set(token), done | (token == EOS_ID)

    zeros = jnp.zeros((cfg.num_decoder_layers, B, cfg.num_heads, max_len, cfg.d_kv), encoded.dtype)
    state = (jnp.int32(0), jnp.full((B,), PAD_ID, jnp.int32), (zeros, zeros),
             jnp.zeros((B, max_len), jnp.int32), jnp.zeros((B,), bool))
    return jax.lax.while_loop(lambda s: (s[0] < max_len) & ~jnp.all(s[4]), step, state)[3]


# ========================================================================== performance trick
# It first gives the plain formula it replaces. Gains were measured on 2 CPU cores for the prompt-tuning step
# (B=8, 100 prompt + 128 input + 8 target tokens, dropout 0.1): README, Speed; bench_prompt_step.py.

# Cross-attention that never forms its keys and values. Plain: K = E W_k and V = E W_v for the S encoder
#    positions E [B,S,D], then _attend(q, K, V). Per head, q K^T = (q W_k^T) E^T and probs V = (probs E) W_v:
#    the same attention to float rounding, in fewer multiply-adds when the T queries are few. Measured: with
#    8 target tokens XLA counts 723 instead of 802 GFLOP in the Base prompt step (Small: 169 instead of 186),
#    and the Base step went from 1.20-1.28x to 1.39-1.41x PEFT's speed.
def _attend_encoded(p, q, encoded, bias, drop, site):
    """_attend of q [B,N,T,H] over the keys and values of encoded [B,S,D], without forming them -> [B,T,D]."""
    qk = jnp.einsum("BNTH,DNH->BNTD", q, p["key"]["kernel"])
    logits = einsum_f32("BNTD,BSD->BNTS", qk, encoded) + bias
    probs = _attention_probs(logits, drop, site)
    pe = jnp.einsum("BNTS,BSD->BNTD", probs.astype(encoded.dtype), encoded)
    return _attention_out(p, jnp.einsum("BNTD,DNH->BNTH", pe, p["value"]["kernel"]))


def _absorbs_cross(cfg, S, T):
    """Whether _attend_encoded costs fewer multiply-adds than projecting S keys and values for T queries (per
    example and layer): 2 T N H D + 2 N T S D < 2 S D N H + 2 N T S H. With H = 64 (every T5) up to T ~ 50."""
    N, H, D = cfg.num_heads, cfg.d_kv, cfg.d_model
    return T * N * H * D + N * T * S * D < S * D * N * H + N * T * S * H


def _cross_kv(params, cfg, encoded, queries):
    """Every decoder layer's cross-attention (keys, values) of encoded [B,S,D], stacked [L,B,N,S,H], or None
    when `queries` target positions make _attend_encoded cheaper."""
    if _absorbs_cross(cfg, encoded.shape[1], queries):
        return None
    return jax.vmap(lambda p: tuple(_project(p, encoded, ("key", "value"))))(
        params["decoder"]["layers"]["encoder_decoder_attention"])


# ========================================================================== parameters
# The blocks of one layer, per stack: (HF sub-layer index, HF module, T5X module, T5X pre-norm).
BLOCKS = {"encoder": [(0, "SelfAttention", "attention", "pre_attention_layer_norm"),
                      (1, "DenseReluDense", "mlp", "pre_mlp_layer_norm")],
          "decoder": [(0, "SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                      (1, "EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm"),
                      (2, "DenseReluDense", "mlp", "pre_mlp_layer_norm")]}


def _param_specs(cfg):
    """{T5X path: (shape, init std)}; std None = ones. HF / Mesh TF init scales (1/sqrt(H) is in query)."""
    D, N, H, F, V = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
    attn = {"query": ((D, N, H), (D * H) ** -0.5), "key": ((D, N, H), D ** -0.5),
            "value": ((D, N, H), D ** -0.5), "out": ((N, H, D), (N * H) ** -0.5)}
    mlp = {w: ((D, F), D ** -0.5) for w in (("wi_0", "wi_1") if cfg.gated_gelu else ("wi",))}
    mlp["wo"] = ((F, D), F ** -0.5)
    specs = {"token_embedder/embedding": ((V, D), 1.0)}
    for stack, L in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for _, hf, module, norm in BLOCKS[stack]:  # each layer's weights stacked [L, ...] (_scan_layers)
            specs[f"{stack}/layers/{norm}/scale"] = ((L, D), None)
            kernels = mlp if hf == "DenseReluDense" else attn
            specs.update({f"{stack}/layers/{module}/{k}/kernel": ((L, *shape), std)
                          for k, (shape, std) in kernels.items()})
        specs[f"{stack}/relpos_bias/rel_embedding"] = ((N, cfg.relative_attention_num_buckets), D ** -0.5)
        specs[f"{stack}/{stack}_norm/scale"] = ((D,), None)
    if not cfg.tie_word_embeddings:
        specs["decoder/logits_dense/kernel"] = ((D, V), D ** -0.5)
    return specs


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def init_params(key, cfg, dtype=jnp.float32):
    """Random weights: one normal draw cut into the leaves in the order of T5X's per-layer names (embedding;
    encoder layers_0, layers_1, ..., relpos table; the same for the decoder; logits_dense). A stack's layers
    follow each other in the draw, so each stacked leaf is one strided slice of it. The draw has rows of width
    gcd(leaf sizes), so row offsets stay below 2^31 even for 11B parameters."""
    specs = _param_specs(cfg)
    groups = [(["token_embedder/embedding"], 1)]  # (paths, L): L layers of these leaves, one after another
    for stack, L in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        stacked = [p for p, (_, std) in specs.items() if p.startswith(f"{stack}/layers/") and std is not None]
        groups += [(stacked, L), ([f"{stack}/relpos_bias/rel_embedding"], 1)]
    groups += [(["decoder/logits_dense/kernel"], 1)] * (not cfg.tie_word_embeddings)
    per_layer = {p: math.prod(specs[p][0]["/layers/" in p:]) for paths, _ in groups for p in paths}
    width = math.gcd(*per_layer.values())
    z = jax.random.normal(key, (sum(L * per_layer[p] for paths, L in groups for p in paths) // width, width))
    flat, row = {}, 0
    for paths, L in groups:
        rows = [per_layer[p] // width for p in paths]
        chunk, row = z[row:row + L * sum(rows)].reshape(L, sum(rows), width), row + L * sum(rows)
        for p, begin, n in zip(paths, np.cumsum([0, *rows]).tolist(), rows):
            (shape, std), stacked = specs[p], "/layers/" in p
            block = chunk[:, begin:begin + n].reshape(L, *shape[stacked:])
            flat[p] = (std * (block if stacked else block[0])).astype(dtype)
    flat.update({path: jnp.ones(shape, dtype) for path, (shape, std) in specs.items() if std is None})
    return _unflatten(flat)


def _flatten(tree, prefix=""):
    """{'a': {'b': x}} -> {'a/b': x}."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for name, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{name}/").items()}


def _unflatten(flat):
    tree = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def param_count(cfg):
    """Number of parameters, without allocating any."""
    return sum(math.prod(shape) for shape, _ in _param_specs(cfg).values())


# ========================================================================== Hugging Face checkpoints
def _config_from_hf(cls, c, where):
    """One error naming the file for a config.json that is not a T5 we can run: not T5, a size missing, or a
    feed-forward we do not implement (it would load as another one without a word)."""
    if not isinstance(c, dict):
        raise ValueError(f"{where} holds a JSON {type(c).__name__}, not an object: it is not a T5 config")
    problems = [f"model_type={c.get('model_type')!r}"] * (c.get("model_type", "t5") not in ("t5", "mt5"))
    problems += [f"no {k}" for k in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers") if k not in c]
    if c.get("feed_forward_proj", "relu") not in ("relu", "gated-gelu"):  # T5 1.0, T5 1.1
        problems.append(f"feed_forward_proj={c['feed_forward_proj']!r}, not relu or gated-gelu")
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)}: it is not a T5 config we can run")
    # T5 1.0 vs 1.1 output layer. Configs up to transformers 4.x say it with tie_word_embeddings; 5.x writes
    # tie_word_embeddings=true for every T5 (even a T5 1.1 it loaded and saves again, with its own
    # lm_head.weight) and keeps the d_model^-0.5 rescaling, i.e. T5 1.0, in scale_decoder_outputs.
    tied = c.get("scale_decoder_outputs")
    tied = bool(c.get("tie_word_embeddings", True) if tied is None else tied)
    gated = c.get("feed_forward_proj", "relu") == "gated-gelu"
    return cls(c.get("vocab_size", 32128), c["d_model"], c["d_kv"], c["d_ff"], c["num_heads"],
               c["num_layers"], c.get("num_decoder_layers") or c["num_layers"],
               c.get("relative_attention_num_buckets", 32), c.get("relative_attention_max_distance", 128),
               gated, tied, c.get("dropout_rate", 0.1), c.get("layer_norm_epsilon", 1e-6),
               c.get("_name_or_path", "") or "")


def hf_name_map(cfg):
    """HF PyTorch tensor name -> (T5X param path, layer): the names t5x/checkpoint_importer.py and
    transformers' models/t5/convert_t5x_checkpoint_to_flax.py map between, except that T5X's
    encoder/layers_{i}/... is row i of our stacked encoder/layers/... (layer None: a leaf not stacked)."""
    names = {"shared.weight": ("token_embedder/embedding", None),
             "encoder.final_layer_norm.weight": ("encoder/encoder_norm/scale", None),
             "decoder.final_layer_norm.weight": ("decoder/decoder_norm/scale", None)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("decoder/logits_dense/kernel", None)
    attn = {"q": "query", "k": "key", "v": "value", "o": "out"}
    mlp = {w: w for w in (("wi_0", "wi_1", "wo") if cfg.gated_gelu else ("wi", "wo"))}
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        relpos = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        names[relpos] = (f"{stack}/relpos_bias/rel_embedding", None)
        for i in range(n_layers):
            for j, hf, t5x, norm in BLOCKS[stack]:
                src, dst = f"{stack}.block.{i}.layer.{j}.", f"{stack}/layers/"
                names[src + "layer_norm.weight"] = (dst + norm + "/scale", i)
                for a, b in (mlp if hf == "DenseReluDense" else attn).items():
                    names[f"{src}{hf}.{a}.weight"] = (f"{dst}{t5x}/{b}/kernel", i)
    return names


def _hf_layout(path, shape):
    """(HF shape, T5X shape split as (out axes, in axes)) of a T5X param. torch Linear stores a kernel
    [*in, *out] as [out, in] with the heads merged (N*H); HF's relpos table [K,N] is transposed too. The
    embedding and the norms are stored as they are: (shape, None)."""
    if path == "token_embedder/embedding" or path.endswith("/scale"):
        return shape, None
    k = 2 if path.endswith("out/kernel") else 1  # the input axes: N,H of out [N,H,D]; D of query [D,N,H]
    return (math.prod(shape[k:]), math.prod(shape[:k])), (shape[k:], shape[:k])


def _as_t5x(w, path, shape):
    """The HF tensor w as a view of T5X shape `shape`: no copy, so a memory map stays on disk."""
    split = _hf_layout(path, shape)[1]
    if split is None:
        return w
    out, inp = split  # [out, in] -> [*out, *in] -> [*in, *out]
    return w.reshape(*out, *inp).transpose(*range(len(out), len(shape)), *range(len(out)))


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32}


def _read_safetensors(path):
    """{name: np.ndarray (memory-mapped)} from a .safetensors file: u64 header size, JSON header, raw data.
    Read by hand because safetensors' numpy loader cannot return bfloat16. Each tensor's bytes are checked
    to be those of its dtype and shape, inside the file, before they are viewed: a damaged or hostile file
    fails in one line naming it."""
    size, tensors = path.stat().st_size, {}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} in {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for k, v in header.items():
            (begin, end), dtype = v["data_offsets"], _ST_DTYPES.get(v["dtype"])
            if dtype is None or not 0 <= begin <= end <= data.size or (
                    math.prod(v["shape"]) * np.dtype(dtype).itemsize != end - begin):
                raise ValueError(f"tensor {k!r} {v} is not F32, F16 or BF16 data of its shape within the "
                                 f"{data.size} bytes of data")
            tensors[k] = data[begin:end].view(dtype).reshape(v["shape"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON and unicode errors are ValueErrors
        raise ValueError(f"{path} is not a complete safetensors file ({type(e).__name__}: {e}): download it "
                         "again") from None
    return tensors


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch checkpoint: reading it needs torch (pip install torch), "
                          "or convert it to model.safetensors") from None
    # mmap needs torch's zip format (torch >= 1.6); older pytorch_model.bin files are read into memory.
    # weights_only: a pickle that imports anything but tensor types is refused, never run. torch's message
    # then advises weights_only=False, which would run it: replaced by one line without that advice.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        odd = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)] if isinstance(sd, dict) else None
        problem = (f" holds a {type(sd).__name__}, not a dict of tensors" if odd is None else
                   odd and f": {odd[0]!r} is of type {type(sd[odd[0]]).__name__}, not a tensor")
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as e:  # a cut zip, text
        imports = re.search(r"GLOBAL (\S+)", str(e))
        problem = (f" is refused: reading it would import {imports.group(1)}, which can run code; use "
                   "weights from a source you trust, as safetensors" if imports else
                   f" is not a readable PyTorch checkpoint ({str(e).split('. ')[0] or type(e).__name__})")
    if problem:
        raise ValueError(f"{path}{problem}")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}


def _read_tensors(d):
    for single, index, reader in (("model.safetensors", "model.safetensors.index.json", _read_safetensors),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_torch)):
        if (d / single).exists():
            files = [d / single]
        elif (d / index).exists():  # sharded: the index's weight_map names the file of every tensor
            files = [d / f for f in sorted(set(json.loads((d / index).read_text())["weight_map"].values()))]
        else:
            continue
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{d / index} names {f.name}, which is not in {d}: download the "
                                        "missing shard")
            with open(f, "rb") as fh:  # `git clone` without git-lfs leaves small text pointer files
                if fh.read(64).startswith(b"version https://git-lfs"):
                    raise ValueError(f"{f} is a Git LFS pointer, not the weights: run `git lfs pull` in {d}")
        return {k: v for f in files for k, v in reader(f).items()}
    raise FileNotFoundError(f"no weights in {d}: expected model.safetensors or pytorch_model.bin (or their "
                            "index.json)")


def _hf_tensors(d, cfg, config):
    """_read_tensors, with the variants of HF's exports brought to the names hf_name_map expects."""
    tensors, tied = _read_tensors(d), cfg.tie_word_embeddings
    if "shared.weight" not in tensors:  # some exports keep only the per-stack copies of the embedding
        tensors.update({"shared.weight": tensors[k] for k in ("decoder.embed_tokens.weight",
                                                              "encoder.embed_tokens.weight") if k in tensors})
    # Early HF conversions of T5 1.0 hold a relpos table for the first cross-attention, which has none;
    # transformers ignores it too: https://github.com/huggingface/transformers/issues/2334
    tensors.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    # Tied checkpoints may repeat the embedding under these names: drop copies that equal shared.weight.
    shared = tensors.get("shared.weight")
    for name in ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] + ["lm_head.weight"] * tied:
        if name in tensors and shared is not None and np.array_equal(tensors[name], shared):
            del tensors[name]
    # transformers 5.x saves a T5 1.1 built in memory with its unscaled output layer tied to the embedding
    # (tie_word_embeddings=true, scale_decoder_outputs=false) and no lm_head.weight: it is shared.weight.
    untied_but_saved_tied = not tied and config.get("tie_word_embeddings", True)
    if untied_but_saved_tied and "lm_head.weight" not in tensors and shared is not None:
        tensors["lm_head.weight"] = shared
    return tensors


def _resolve(path_or_hub_id):
    d = Path(path_or_hub_id).expanduser()
    if d.is_dir():
        return d
    if d.is_file():
        raise NotADirectoryError(f"{path_or_hub_id} is a file: pass the checkpoint directory ({d.parent})")
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path_or_hub_id)
    if d.is_absolute() or path_or_hub_id.startswith(".") or not hub_id:
        raise FileNotFoundError(f"checkpoint directory {path_or_hub_id} does not exist")
    from huggingface_hub import snapshot_download
    # config.json and one copy of the weights: hub T5 repos often hold safetensors, .bin, TF and Flax copies
    try:
        for weights in ("model*.safetensors*", "pytorch_model*.bin*"):
            d = Path(snapshot_download(path_or_hub_id, allow_patterns=["config.json", weights]))
            if any(d.glob(weights)):
                break
        return d
    except Exception as e:
        raise FileNotFoundError(f"{path_or_hub_id} is no directory, nor a hub model: {e}") from e


def check_finite_weights(params, where):
    """Refuse weights holding NaN or inf (a damaged conversion or download): they would score 0 or 50 without
    an error. One reduction per leaf where it lives, one transfer to the host (~0.15 s for Base on a CPU)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    finite = np.asarray(jnp.stack([jnp.isfinite(x).all() for _, x in leaves]))
    if not finite.all():
        path, x = leaves[int(np.argmin(finite))]
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "/layers/" in name:  # a stack [L, ...]: name the layer, as the checkpoint's layers_{i} does
            i = int(np.argmin(np.asarray(jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1))))
            name, x = name.replace("/layers/", f"/layers_{i}/"), x[i]
        bad = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(f"{where}: weight {name} holds NaN or inf ({bad} of {x.size} values): every score "
                         "would be meaningless")


def load_checkpoint(path_or_hub_id, dtype=jnp.float32, shardings=None):
    """A HF T5 checkpoint (local directory or hub id) -> (T5Config, params with T5X names, cast to dtype).
    shardings(shapes) -> a pytree of jax Shardings like params (spot.param_shardings): each leaf is then built
    from the blocks this process's devices hold, read from the memory-mapped safetensors file: no host holds a
    whole tensor that its devices split, and no process sends weights to another."""
    d = _resolve(str(path_or_hub_id))
    if not (d / "config.json").exists():  # T5X checkpoints: the format of the official code
        t5x = (d / "checkpoint").is_file() or any(d.glob("checkpoint_*/checkpoint"))
        why = "is a T5X checkpoint (msgpack + zarr)" if t5x else "has no config.json"
        raise FileNotFoundError(f"{d} {why}: pass a Hugging Face T5 checkpoint or hub id "
                                "(google/t5-base-lm-adapt is T5X's t5_1_1_lm100k_base)")
    try:
        config = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{d / 'config.json'} is not valid JSON ({e})") from None
    cfg = T5Config.from_hf(config, where=d / "config.json")
    tensors, want = _hf_tensors(d, cfg, config), {p: shape for p, (shape, _) in _param_specs(cfg).items()}
    names, views, problems = hf_name_map(cfg), {}, []  # views: T5X path -> {layer: HF tensor as T5X}
    for name, (path, layer) in names.items():
        shape = want[path][1:] if layer is not None else want[path]
        hf_shape = _hf_layout(path, shape)[0]
        if name not in tensors:
            problems.append(f"missing tensor {name}")
        elif tuple(tensors[name].shape) != hf_shape:
            problems.append(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {hf_shape}")
        else:
            views.setdefault(path, {})[layer] = _as_t5x(tensors[name], path, shape)
    problems += [f"unexpected tensor {k}" for k in tensors if k not in names]
    if problems:
        raise ValueError(f"checkpoint {d} does not match its config.json: {'; '.join(problems)}")
    placed = {} if not shardings else _flatten(
        shardings(_unflatten({k: jax.ShapeDtypeStruct(v, dtype) for k, v in want.items()})))
    flat = {}
    for path, by_layer in views.items():
        def block(index, by_layer=by_layer):  # index: slices of the (stacked) T5X shape
            if None in by_layer:
                return np.asarray(by_layer[None][tuple(index)], dtype)
            layers = range(len(by_layer))[index[0]]
            return np.stack([np.asarray(by_layer[i][tuple(index[1:])], dtype) for i in layers])
        if path in placed:  # each device's block is read on its own from the views of the memory map
            flat[path] = jax.make_array_from_callback(want[path], placed[path], block)
        else:
            flat[path] = jnp.asarray(block((slice(None),) * len(want[path])))
    check_finite_weights(flat, d)
    return cfg, _unflatten(flat)
