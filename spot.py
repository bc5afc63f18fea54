"""SPoT: soft prompt tuning and transfer on a frozen T5 (Vu et al., ACL 2022; Lester et al., 2021), pure JAX.

§2.1    the prompt [P,D], prepended to the embedded input, is the only trained parameter: prompt_loss, train_step
§2.1.4  recipe (Adafactor lr 0.3, batch 32, 2^18 steps, dropout 0.1, best of evaluations every 500 steps):
        TrainConfig, make_optimizer, train_prompt (checkpoints, exact resume, NaN stop)
§2.1.4, App. C  initialisations (sampled vocabulary, class labels, text, uniform) and SPoT's transfer
        (start from a source prompt file): PromptConfig, init_prompt
§3.2    the prompt after 10K steps is the task embedding (fn. 13): TrainConfig.embedding_step -> prompt_step10000.npy
App. C  ModelTuning baseline of Figure 1 (every weight trains): MODEL_TUNING, model_tuning_step
Evaluation on validation (greedy decoding or rank classification -> task metric): evaluate, make_evaluator
Data/model parallelism: make_mesh, shard_params, shard_batch, replicate.   CLI: `python spot.py train|eval --help`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import t5_model

INITS = ('sampled_vocab', 'class_labels', 'text', 'uniform', 'file')


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    length: int = 100            # P: SPoT §2.1, "L = 100"
    init: str = 'sampled_vocab'  # §2.1.4: source prompts start from sampled vocabulary (targets: App. C); see INITS
    vocab_pool: int = 5000       # §2.1.4 / Lester et al. 2021: the 5,000 most common tokens = ids < 5000
    uniform_scale: float = 0.5   # PT code prompts.py default uniform(scale=0.5) = U[0, 0.5) (NOTES §7.3; we follow
                                 # the code that produced Lester's numbers, not its text's [-0.5, 0.5])
    source: str = ''             # 'file': a .npy [P,D] source prompt (SPoT's transfer, §2)
    text: str = ''               # 'text': its token embeddings fill the first rows (Lester: ReCoRD, WSC)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f'unknown prompt init {self.init!r}; known: {INITS}')
        if self.length < 1 or self.vocab_pool < 1:
            raise ValueError(f'PromptConfig needs length >= 1 and vocab_pool >= 1, '
                             f'got {self.length} and {self.vocab_pool}')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2**18               # §2.1.4 "2^18 steps, following Raffel et al." (30K "-longer tuning"; §3: 100K)
    batch_size: int = 32             # §2.1.4
    learning_rate: float = 0.3       # footnote 7; PT runs/prompt_finetune.gin: constant 0.3
    decay_rate: float = 0.8          # Adafactor beta2 exponent: PT configs/models/t5_1_1_prompt.gin; Lester et al.
    decay_offset: int = 0            # t5_1_1_prompt.gin step_offset=0 (PEERS §5: -1_100_000 = the 1.1M ckpt counter)
    param_scale: bool = False        # footnote 7: "parameter scaling off"
    weight_decay: float = 1e-5       # footnote 7 (T5X: (1 - wd) * param, not scaled by the learning rate)
    clipping_threshold: float = 1.0  # T5X Adafactor default update clipping (NOTES §7.4)
    z_loss: float = 1e-4             # PT t5_1_1_prompt.gin Z_LOSS
    dropout: float = 0.1             # §2.1.4 "dropout 0.1"; T5X runs/finetune.gin DROPOUT_RATE
    eval_every: int = 500            # §2.1.4: checkpoints every 500 steps, best validation score reported
    checkpoint_every: int = 500      # resumable checkpoint period (one is also written at every evaluation)
    embedding_step: int = 10_000     # §3.2 footnote 13: prompts after 10K steps are the task embeddings
    log_every: int = 100             # progress line period
    seed: int = 0                    # data order, prompt init and dropout keys
    max_input_len: int = 512         # not in the paper; PT demo scripts: {'inputs': 512, 'targets': 8} (NOTES §1)
    max_target_len: int = 0          # 0 = the task's data.Task.target_len (8 for classification, as the PT demos)
    eval_batch_size: int = 64
    eval_limit: int = 0              # evaluate on the first N validation examples only (0 = all: the paper)
    eval_method: str = 'decode'      # 'decode': T5 greedy decoding; 'rank': score every label (classification only)
    sub_batches: int = 0             # execution only (train_step); 0 = auto: 2 on one CPU device, else 1

    def __post_init__(self):         # refuse now what would fail (or divide by zero) only after hours of training
        bad = [f'{f}={getattr(self, f)} (must be >= {lo})' for lo, names in (
            (1, ('steps', 'batch_size', 'eval_every', 'checkpoint_every', 'log_every', 'eval_batch_size',
                 'max_input_len')), (0, ('embedding_step', 'max_target_len', 'eval_limit', 'sub_batches')))
            for f in names if getattr(self, f) < lo]
        if self.eval_method not in ('decode', 'rank'):
            bad.append(f"eval_method={self.eval_method!r} (must be 'decode' or 'rank')")
        if bad:
            raise ValueError(f"bad TrainConfig: {', '.join(bad)}")


# App. C: ModelTuning uses T5 defaults: Adafactor, constant lr 0.001, dropout 0.1, parameter scaling on
# (T5X Adafactor default), no weight decay; 2^16 tokens per batch = 128 inputs of 512 tokens. The paper also restores
# the pre-training optimizer state: we cannot (the released checkpoints carry no optimizer state).
MODEL_TUNING = TrainConfig(learning_rate=1e-3, param_scale=True, weight_decay=0.0, batch_size=128)


def override(cfg, argv):
    """Apply each `--field=value` of argv naming a field of cfg; return (new cfg, the other items).
    Example: override(TrainConfig(), ['--steps=30000', '--x=1']) -> (TrainConfig(steps=30000, ...), ['--x=1'])."""
    fields, changes, rest = {f.name for f in dataclasses.fields(cfg)}, {}, []
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        name = name.replace('-', '_')
        if not (arg.startswith('--') and eq and name in fields):
            rest.append(arg)
            continue
        want = type(getattr(cfg, name))
        try:                                              # a str field keeps its text as is: --text=1984
            value = text if want is str else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        value = float(value) if want is float and type(value) is int else value
        if type(value) is not want:
            raise ValueError(f'--{name}={text}: {type(cfg).__name__}.{name} expects {want.__name__}, '
                             f'got {type(value).__name__}')
        changes[name] = value
    return dataclasses.replace(cfg, **changes), rest


# ----------------------------------------------------------------------------------------------- prompts
def check_prompt(prompt, d_model: int, length: int | None = None, what: str = 'prompt'):
    """Refuse a prompt that is not a finite float [P, d_model] (e.g. a Base prompt, 768 wide, on a Small model)."""
    prompt = prompt if hasattr(prompt, 'dtype') else np.asarray(prompt)
    shape = tuple(prompt.shape)
    if len(shape) != 2:
        raise ValueError(f'{what} has shape {shape}: a prompt is a 2-D array [P, D], and this model needs '
                         f'D = d_model {d_model}; save one prompt [P, {d_model}] per .npy')
    if shape[1] != d_model:
        raise ValueError(f'{what} has shape {shape}: width {shape[1]} but the model has '
                         f'd_model {d_model}. Prompts transfer only between models of the same width; '
                         f'use a source prompt trained on a model of the same size')
    if length is not None and shape[0] != length:
        raise ValueError(f'{what} has {shape[0]} rows but PromptConfig.length is {length}: '
                         f'pass --length={shape[0]}')
    if not jnp.issubdtype(prompt.dtype, jnp.floating):
        raise ValueError(f'{what} has dtype {prompt.dtype}: a prompt holds real (float) values')
    if not np.isfinite(np.asarray(prompt, np.float32)).all():
        raise ValueError(f'{what} holds NaN or inf values: it comes from a diverged run; use an earlier prompt')


def _token_rows(emb, ids, what):
    """Embedding rows of token ids, float32 [n, D]; ids outside [0, V) are refused (jnp indexing would clamp)."""
    ids = np.asarray(ids if ids is not None else [])
    if ids.ndim != 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer) or not (
            0 <= ids.min() and ids.max() < emb.shape[0]):
        raise ValueError(f'{what}: expected a non-empty list of token ids in [0, {emb.shape[0]}), got {ids.tolist()}')
    return jnp.asarray(emb[ids], jnp.float32)


def init_prompt(key, params, cfg: PromptConfig | str, label_ids=None, text_ids=None) -> jax.Array:
    """The starting prompt, float32 [P,D]. params: the frozen T5 (only its embedding [V,D] is read; 'file' and
    'uniform' need just its shape, so jax.eval_shape(...) params do). label_ids: token ids of each class label
    (class_labels); text_ids: token ids of the string (text); both without EOS."""
    cfg = PromptConfig(init=cfg) if isinstance(cfg, str) else cfg
    emb = params['token_embedder']['embedding']
    (V, D), P = emb.shape, cfg.length
    if cfg.init == 'file':                       # SPoT §2: the target prompt starts as the source prompt
        if not cfg.source:
            raise ValueError("init 'file' needs PromptConfig.source (CLI: --source-prompt PATH.npy)")
        try:
            prompt = np.load(cfg.source)
        except (ValueError, EOFError) as e:     # truncated, pickled, not a .npy at all
            raise ValueError(f'cannot read source prompt {cfg.source} ({e}): expected a .npy of a float array '
                             f'[{P}, {D}], as np.save writes it') from None
        if not isinstance(prompt, np.ndarray):  # an .npz archive
            prompt.close()
            raise ValueError(f'source prompt {cfg.source} is an .npz archive; save the [{P}, {D}] prompt with np.save')
        check_prompt(prompt, D, P, what=f'source prompt {cfg.source}')
        return jnp.asarray(prompt, jnp.float32)
    if cfg.init == 'uniform':
        return jax.random.uniform(key, (P, D), jnp.float32, 0.0, cfg.uniform_scale)
    if cfg.vocab_pool > V:                       # else jnp indexing would clamp ids >= V to the last row
        raise ValueError(f'vocab_pool {cfg.vocab_pool} exceeds the model\'s vocabulary of {V} rows: '
                         f'pass --vocab_pool={V} (or fewer)')
    if P > cfg.vocab_pool:
        raise ValueError(f'cannot sample {P} distinct rows from a pool of {cfg.vocab_pool} ids')
    # §2.1.4 / Lester et al. 2021: T5's SentencePiece ids are ordered by frequency, so ids < 5000 are the most common
    # tokens; rows are drawn without replacement (PT from_sample_of_embeddings).
    ids = jax.random.choice(key, cfg.vocab_pool, (P,), replace=False)
    prompt = jnp.asarray(emb[ids], jnp.float32)
    if cfg.init == 'class_labels':               # App. C; Lester et al.: label i at position i, pieces mean-pooled
        label_ids = [] if label_ids is None else list(label_ids)
        if not 1 <= len(label_ids) <= P:
            raise ValueError(f'class_labels needs the token ids of 1 to {P} labels (one per prompt row), got '
                             f'{len(label_ids)} labels: use --length={max(len(label_ids), 1)} or more')
        rows = [_token_rows(emb, p, f'class label {i}').mean(0) for i, p in enumerate(label_ids)]
        prompt = prompt.at[:len(rows)].set(jnp.stack(rows))
    elif cfg.init == 'text':                     # a text longer than the prompt: its first P tokens
        rows = _token_rows(emb, text_ids, 'text init (the token ids of PromptConfig.text, --text="...")')[:P]
        prompt = prompt.at[:len(rows)].set(rows)
    return prompt


# ----------------------------------------------------------------------------------------------- the step
def seq2seq_loss(logits, targets, z_loss: float):
    """Cross-entropy + z_loss * log(Z)^2 (T5X losses.py), averaged over non-pad target tokens. logits [B,T,V]."""
    # Normalisation: T5X sums over tokens (LOSS_NORMALIZING_FACTOR=None, NOTES §7.4); we average. Adafactor divides
    # each gradient by the root of its running mean square, so a constant factor on the loss leaves the update
    # unchanged (only batches with different token counts weigh differently inside that running mean), and the mean
    # keeps the printed loss a per-token number comparable across batch sizes.
    log_z = jax.nn.logsumexp(logits, axis=-1)
    ce = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = (targets != t5_model.PAD_ID).astype(jnp.float32)
    return jnp.sum((ce + z_loss * log_z ** 2) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def prompt_loss(prompt, frozen, batch, cfg, dropout_key=None, z_loss=1e-4):
    """Loss of the frozen T5 (cfg) reading [prompt; embedded inputs] (Lester §2). prompt [P,D]; batch int32
    'inputs' [B,S], 'targets' [B,T]; dropout_key None = evaluation (no dropout)."""
    decoder_inputs = t5_model.shift_right(batch['targets'])
    logits = t5_model.forward(frozen, cfg, batch['inputs'], decoder_inputs, prompt=prompt, dropout_key=dropout_key)
    return seq2seq_loss(logits, batch['targets'], z_loss)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adafactor as in T5X (PEERS §5: matches t5x/adafactor.py to ~3e-6). The [P,D] prompt has P = 100 < 128 =
    min_dim_size_to_factor, so its second moment is unfactored, as in the official runs; no momentum."""
    return optax.adafactor(learning_rate=tc.learning_rate, decay_rate=tc.decay_rate, decay_offset=tc.decay_offset,
                           multiply_by_parameter_scale=tc.param_scale, clipping_threshold=tc.clipping_threshold,
                           momentum=None, weight_decay_rate=tc.weight_decay or None, eps=1e-30)


def dropout_key(seed: int, step: int) -> jax.Array:
    """Dropout key of a training step: a pure function of (seed, step), so a resumed run draws the same masks."""
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], step)


# The TrainConfig fields the steps compute with. Callers pass step_config(tc) as the static `tc`, so runs that differ
# in steps, seed, evaluation period, ... reuse one compiled step instead of recompiling (seconds each on CPU).
_STEP_FIELDS = ('learning_rate', 'decay_rate', 'decay_offset', 'param_scale', 'weight_decay', 'clipping_threshold',
                'z_loss', 'dropout', 'sub_batches')


def step_config(tc: TrainConfig) -> TrainConfig:
    """tc with every field but _STEP_FIELDS at its default: the static argument of train_step/model_tuning_step."""
    return TrainConfig(**{f: getattr(tc, f) for f in _STEP_FIELDS})


@functools.partial(jax.jit, static_argnames=('cfg', 'tc'), donate_argnames=('prompt', 'opt_state'))
def train_step(prompt, opt_state, frozen, batch, key, cfg, tc: TrainConfig):
    """One prompt-tuning update. Only argument 0 (the prompt) is differentiated: no weight gradient is ever built,
    and `frozen` is a jit argument, not a constant baked into the program. Returns (prompt, opt_state, loss)."""
    cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout)         # §2.1.4: dropout 0.1 while training
    loss, grad = jax.value_and_grad(_sub_batch_loss)(prompt, frozen, batch, cfg, key, tc)
    updates, opt_state = make_optimizer(tc).update(grad, opt_state, prompt)
    return optax.apply_updates(prompt, updates), opt_state, loss


def _sub_batch_loss(prompt, frozen, batch, cfg, key, tc: TrainConfig):
    """prompt_loss of the batch, computed as k independent sub-batches (tc.sub_batches; rows i::k) whose mean losses
    are weighted by their target-token counts: the same loss, gradient (to float rounding) and dropout masks (one key
    per example) for every k. Execution only: XLA:CPU runs independent ops on different cores at once, so k = 2 keeps
    2 cores busier (README, Speed: k = 4 was no faster and compiled longer). On accelerators k = 1."""
    B = batch['targets'].shape[0]
    k = tc.sub_batches or (2 if jax.default_backend() == 'cpu' and jax.device_count() == 1 else 1)
    k = math.gcd(k, B)
    if k == 1:
        return prompt_loss(prompt, frozen, batch, cfg, key, tc.z_loss)
    keys, total, tokens = jax.random.split(key, B), 0.0, 0.0
    for i in range(k):
        sub = {name: batch[name][i::k] for name in ('inputs', 'targets')}
        n = jnp.sum(sub['targets'] != t5_model.PAD_ID).astype(jnp.float32)
        total += prompt_loss(prompt, frozen, sub, cfg, keys[i::k], tc.z_loss) * n
        tokens += n
    return total / jnp.maximum(tokens, 1.0)


@functools.partial(jax.jit, static_argnames=('cfg', 'tc'), donate_argnames=('params', 'opt_state'))
def model_tuning_step(params, opt_state, batch, key, cfg, tc: TrainConfig = MODEL_TUNING):
    """ModelTuning baseline (Figure 1, App. C): every parameter trains, no prompt. Not SPoT: kept apart on purpose.
    opt_state = make_optimizer(MODEL_TUNING).init(params). Returns (params, opt_state, loss)."""
    cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout)
    loss, grad = jax.value_and_grad(lambda p: prompt_loss(None, p, batch, cfg, key, tc.z_loss))(params)
    updates, opt_state = make_optimizer(tc).update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# ----------------------------------------------------------------------------------------------- sharding
# Megatron-style split of the frozen weights over the 'model' axis: attention heads N, MLP width F, vocabulary V
# (else D). Candidate axes in order of preference; a leaf none of whose candidates divides stays replicated.
_MODEL_AXES = {'query': (1,), 'key': (1,), 'value': (1,), 'out': (0,), 'wi': (1,), 'wi_0': (1,), 'wi_1': (1,),
               'wo': (0,), 'token_embedder': (0, 1), 'logits_dense': (1, 0)}


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh over all devices: batch split over 'data', frozen weights over 'model'."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if model_parallel < 1 or devices.size % model_parallel:
        raise ValueError(f'{devices.size} devices cannot be split into model-parallel groups of {model_parallel}')
    return Mesh(devices.reshape(-1, model_parallel), ('data', 'model'))


def param_shardings(mesh: Mesh, params):
    """NamedSharding for every frozen leaf (a pytree like params)."""
    n = mesh.shape['model']

    def spec(path, x):
        names = [getattr(k, 'key', None) for k in path]
        for axis in next((_MODEL_AXES[m] for m in reversed(names) if m in _MODEL_AXES), ()):
            if x.shape[axis] % n == 0:
                return NamedSharding(mesh, PartitionSpec(*[('model' if a == axis else None)
                                                           for a in range(x.ndim)]))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(mesh: Mesh | None, params):
    """Frozen weights onto the 'model' axis (see _MODEL_AXES); mesh None: unchanged."""
    return params if mesh is None else jax.device_put(params, param_shardings(mesh, params))


def shard_batch(mesh: Mesh | None, batch):
    """A batch split along its leading (batch) axis over 'data'; mesh None: unchanged."""
    if mesh is None:
        return batch
    b = next(iter(batch.values())).shape[0]
    if b % mesh.shape['data']:
        raise ValueError(f"batch size {b} is not divisible by the {mesh.shape['data']} data-parallel devices: "
                         f"pick a --batch_size that is, or a larger --model-parallel")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))


def replicate(mesh: Mesh | None, tree):
    """A full copy on every device (the prompt and its optimizer state: 100 x D floats); mesh None: unchanged."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ----------------------------------------------------------------------------------------------- files
def _json(obj, indent=1, strict=True) -> bytes:
    """JSON text of run metadata. numpy/jax scalars and arrays (an evaluator's np.float32 score) become Python
    numbers, anything else JSON lacks (a Path) its str. strict: NaN/inf (Pearson of constant predictions) -> null,
    so jq or JavaScript read prompt.json; the checkpoint keeps them (strict=False) to resume to the same bits."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return plain(np.asarray(x).tolist())
        if isinstance(x, float):
            return None if strict and not math.isfinite(x) else x
        return x if x is None or isinstance(x, (str, int, bool)) else str(x)
    return json.dumps(plain(obj), indent=indent, allow_nan=not strict).encode()


def _atomic(path: Path, write):
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)                    # a reader (or a resume after a crash) sees the old or the new file


def save_prompt(out: Path, name: str, prompt, info: dict):
    """out/name.npy (float32 [P,D], the format of Google's released prompts) + out/name.json (info)."""
    _atomic(out / f'{name}.npy', lambda f: np.save(f, np.asarray(prompt, np.float32)))
    _atomic(out / f'{name}.json', lambda f: f.write(_json(info)))


def save_checkpoint(path: Path, prompt, opt_state, state: dict):
    """Everything a resume needs: prompt, optimizer leaves, and state (step = data position; seed = RNG)."""
    leaves = {f'opt_{i}': np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(opt_state))}
    text = np.array(_json(state, None, strict=False).decode())
    _atomic(path, lambda f: np.savez(f, prompt=np.asarray(prompt), state=text, **leaves))


def load_checkpoint(path: Path, optimizer):
    """-> (prompt, opt_state, state) as saved by save_checkpoint. A damaged file raises ValueError naming it."""
    try:
        with np.load(path) as z:
            state, prompt = json.loads(str(z['state'])), jnp.asarray(z['prompt'])
            like, tree = jax.tree_util.tree_flatten(optimizer.init(prompt))
            leaves = [jnp.asarray(z[f'opt_{i}']) for i in range(len(like))]
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:   # truncated, garbage, ...
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}): delete it to start the run '
                         f'over (prompt.npy keeps the best prompt so far)') from None
    if [(x.shape, x.dtype) for x in leaves] != [(x.shape, x.dtype) for x in like]:
        raise ValueError(f'{path}: its optimizer state does not fit this optimizer and its {prompt.shape} prompt')
    return prompt, jax.tree_util.tree_unflatten(tree, leaves), state


# ----------------------------------------------------------------------------------------------- the loop
def weights_fingerprint(frozen) -> str:
    """16 hex digits of sha256 over a few small leaves that differ between any two checkpoints of one architecture
    (the final norms and relative-position tables: e.g. T5 1.1 and its LM-adapted version), so that a resume with
    other weights of the same shape is refused."""
    h = hashlib.sha256()
    for stack, norm in (('encoder', 'encoder_norm'), ('decoder', 'decoder_norm')):
        for x in (frozen[stack][norm]['scale'], frozen[stack]['relpos_bias']['rel_embedding']):
            h.update(np.asarray(x, np.float32).tobytes())
    return h.hexdigest()[:16]


def train_prompt(prompt, frozen, cfg, tc: TrainConfig, batches, evaluator=None, out_dir='runs/prompt', *,
                 meta=None, resume=False, mesh=None, log=print) -> dict:
    """Prompt tuning (§2.1.4): tc.steps updates of `prompt` [P,D] on the frozen T5 (cfg, frozen).

    batches(start) -> iterator whose k-th item is batch start+k, a pure function of (seed, start+k) (data.batches).
    evaluator(prompt) -> dict with 'score' (higher is better), called every tc.eval_every steps and at the end; the best
    prompt is kept as out_dir/prompt.npy (+ .json with meta, step, score, config). Without `evaluator` prompt.npy is
    the last prompt. The prompt after tc.embedding_step steps goes to prompt_step{N}.npy. checkpoint.npz (atomic)
    holds prompt, optimizer state, step (= data position), seed, best score; resume=True continues from it to the
    same bits as an uninterrupted run, and refuses a checkpoint of another model (architecture or weights), prompt
    shape, `meta` (task, ...) or TrainConfig; without resume an existing checkpoint is refused, never overwritten. A
    non-finite loss or prompt raises FloatingPointError, leaving the last good checkpoint.
    Returns {'prompt', 'opt_state', 'step', 'best_score', 'best_step', 'losses'}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_prompt(prompt, frozen['token_embedder']['embedding'].shape[1])
    optimizer, ckpt = make_optimizer(tc), out / 'checkpoint.npz'
    prompt = jnp.array(prompt, jnp.float32)    # a copy: train_step donates (consumes) its prompt buffer
    opt_state = optimizer.init(prompt)
    # What the run is (checkpoint 'run'): the model's architecture (not its name or dropout_rate, which the step
    # overrides), a fingerprint of its weights, and the caller's meta (CLI: model, task, init), as JSON reads them back.
    run = json.loads(_json({'model': {**{k: v for k, v in dataclasses.asdict(cfg).items()
                                         if k not in ('name', 'dropout_rate')}, 'weights': weights_fingerprint(frozen)},
                            'meta': meta or {}}))
    state = {'step': 0, 'data_position': 0, 'seed': tc.seed, 'best_score': None, 'best_step': None,
             'config': dataclasses.asdict(tc), 'run': run}
    if resume and ckpt.exists():
        shape = prompt.shape
        prompt, opt_state, state = load_checkpoint(ckpt, optimizer)
        free = ('steps', 'log_every', 'eval_batch_size')            # change nothing a resumed run computes
        changed = {k: (v, getattr(tc, k)) for k, v in state['config'].items() if k not in free and getattr(tc, k) != v}
        saved = state.get('run', run)                               # checkpoints before 'run' existed: unchecked
        changed.update({f'{part}.{k}': (saved[part][k], v) for part in run for k, v in run[part].items()
                        if k in saved.get(part, {}) and saved[part][k] != v})
        if prompt.shape != shape:
            changed['prompt shape'] = (tuple(prompt.shape), tuple(shape))
        if changed:
            raise ValueError(f'{ckpt} was written with other settings {changed} (saved, now); only {free} may '
                             f'change on resume: rerun the same command, or pick a new --out')
        state.update(config=dataclasses.asdict(tc), run=run)
        log(f"resuming {ckpt} at step {state['step']} (best score {state['best_score']})")
    elif resume:
        log(f'no checkpoint {ckpt} to resume: starting at step 0')
    elif ckpt.exists():                         # starting over would overwrite it at the first checkpoint
        raise FileExistsError(f'{out} holds a run (checkpoint.npz): continue it with --resume (resume=True), or pick '
                              f'a new --out, or delete the folder to start over')
    frozen, (prompt, opt_state) = shard_params(mesh, frozen), replicate(mesh, (prompt, opt_state))
    info = {**(meta or {}), 'config': {'train': dataclasses.asdict(tc), 'model': dataclasses.asdict(cfg)}}
    losses, (t_log, n_log) = [], (time.perf_counter(), state['step'])     # rate window (evaluation excluded)
    data = batches(state['step'])

    def stop(problem):
        last = f'The last good checkpoint {ckpt} (step {state["step"]}) is intact' if ckpt.exists() else \
            'No checkpoint was written yet'
        raise FloatingPointError(f'{problem}: stopping. {last}; lower --learning_rate or check the data and model, '
                                 f'then rerun (with --resume)')

    def keep_best(prompt, done):                # §2.1.4: keep the checkpoint with the best validation score
        metrics = evaluator(prompt)
        log(f'step {done}  eval {_json(metrics, None).decode()}')
        score = float(metrics['score'])
        score = score if math.isfinite(score) else -math.inf   # e.g. Pearson of constants
        if state['best_score'] is None or score > state['best_score']:
            state.update(best_score=score, best_step=done)
            save_prompt(out, 'prompt', prompt, {**info, 'step': done, 'score': metrics['score'], 'metrics': metrics})
        state['eval_pending'] = False
        save_checkpoint(ckpt, prompt, opt_state, state)        # with this evaluation's best score

    if state.get('eval_pending') and evaluator is not None:    # interrupted during the evaluation of state['step']
        keep_best(prompt, state['step'])
    for step in range(state['step'], tc.steps):
        batch = shard_batch(mesh, {k: v for k, v in next(data).items() if k in ('inputs', 'targets')})
        prompt, opt_state, loss = train_step(prompt, opt_state, frozen, batch, dropout_key(tc.seed, step), cfg,
                                             step_config(tc))
        loss, done = float(loss), step + 1
        if not math.isfinite(loss):
            stop(f'loss is {loss} at step {done}')
        losses.append(loss)
        evaluated = evaluator is not None and (done % tc.eval_every == 0 or done == tc.steps)
        checkpoint = evaluated or done % tc.checkpoint_every == 0 or done == tc.steps
        if (checkpoint or done == tc.embedding_step) and not bool(jnp.isfinite(prompt).all()):   # a NaN/inf grad
            stop(f'the prompt has NaN or inf values after step {done} (loss {loss})')
        if done % tc.log_every == 0 or done == tc.steps:
            rate = (done - n_log) / (time.perf_counter() - t_log)
            eta = int((tc.steps - done) / rate)
            log(f'step {done}/{tc.steps}  loss {loss:.4f}  {rate:.2f} steps/s  '
                f'ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}')
            t_log, n_log = time.perf_counter(), done
        if done == tc.embedding_step:           # §3.2: the task embedding
            save_prompt(out, f'prompt_step{done}', prompt, {**info, 'step': done, 'score': None})
        if checkpoint:                          # before evaluating: an evaluator that fails loses no training
            state.update(step=done, data_position=done, eval_pending=evaluated)
            save_checkpoint(ckpt, prompt, opt_state, state)
            if evaluated:
                keep_best(prompt, done)
            t_log, n_log = time.perf_counter(), done
    if evaluator is None and state['step'] == tc.steps:
        save_prompt(out, 'prompt', prompt, {**info, 'step': state['step'], 'score': None})
    return {'prompt': prompt, 'opt_state': opt_state, 'step': state['step'], 'best_score': state['best_score'],
            'best_step': state['best_step'], 'losses': losses}


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(frozen, cfg, prompt, inputs, vocab, *, method='decode', label_names=None, max_target_len=8,
             batch_size=64) -> list[str]:
    """Predicted strings for inputs (int32 [n,S] padded with 0, or a list of token id lists), without dropout, in the
    order of the inputs. 'decode': greedy decoding (T5); 'rank': rank classification, the label whose target string
    has the highest log-likelihood. Examples are grouped by length, and each batch padded to the bucket of its
    longest input (data.bucket_length): few compiled shapes, and short inputs never pay for the longest one."""
    import data
    if method == 'rank':
        if not label_names:
            raise ValueError("eval method 'rank' needs a classification task with label names; use 'decode'")
        labels = data.pad_rows(data.token_ids(vocab, label_names, max_target_len), max_target_len)
    elif method != 'decode':
        raise ValueError(f"unknown eval method {method!r}: 'decode' or 'rank'")
    rows = data.unpad(inputs) if hasattr(inputs, 'shape') else [list(r) for r in inputs]
    cap = inputs.shape[1] if hasattr(inputs, 'shape') else max(map(len, rows), default=1)
    order = np.argsort([len(r) for r in rows], kind='stable')
    preds = [None] * len(rows)
    for i in range(0, len(rows), batch_size):   # a full batch every call (zero rows pad the last): fewer shapes
        chunk = order[i:i + batch_size]
        x = data.pad_rows([rows[j] for j in chunk] + [[]] * (batch_size - len(chunk)),
                      data.bucket_length(max(len(rows[j]) for j in chunk), cap))
        if method == 'decode':
            ids = np.asarray(t5_model.greedy_decode(frozen, cfg, x, prompt, max_len=max_target_len))
            out = [vocab.decode(row[:row.index(t5_model.EOS_ID)] if t5_model.EOS_ID in row else row)
                   for row in ids.tolist()]                       # tokens before EOS (0 after it)
        else:
            scores = np.stack([np.asarray(t5_model.score_targets(
                frozen, cfg, x, np.broadcast_to(lab, (batch_size, lab.size)), prompt)) for lab in labels], axis=1)
            out = [label_names[j] for j in scores.argmax(1)]
        for j, pred in zip(chunk, out):
            preds[j] = pred
    return preds


def make_evaluator(task_name, frozen, cfg, vocab, tc: TrainConfig, split='validation', data_dir=None):
    """The evaluator of train_prompt: prompt -> data.score(...) dict (metrics x100, 'score') on the task's `split`."""
    import data
    task = data.get_task(task_name)
    examples = data.load_examples(task_name, split, data_dir)[:tc.eval_limit or None]
    T = tc.max_target_len or task.target_len
    inputs = data.token_ids(vocab, [t['inputs'] for t in data.text_pairs(task_name, examples)], tc.max_input_len)
    data.score(task_name, examples[:1], [''])   # fails now, not at the first evaluation, if a metric cannot run
    if tc.eval_method == 'rank' and not task.output_labels:
        raise ValueError(f"eval method 'rank' needs a classification task with label names; {task.name}'s targets "
                         f"are not a fixed set of label strings: use --eval_method=decode")

    def run(prompt):
        preds = evaluate(frozen, cfg, prompt, inputs, vocab, method=tc.eval_method, label_names=task.output_labels,
                         max_target_len=T, batch_size=tc.eval_batch_size)
        return data.score(task_name, examples, preds)
    return run


# ----------------------------------------------------------------------------------------------- CLI
def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache, so a second run of the same shapes loads its compiled steps instead
    of compiling them again (seconds to a minute each on CPU). path None: $SPOT_COMPILE_CACHE, else
    $XDG_CACHE_HOME/spot-jax (~/.cache/spot-jax); SPOT_COMPILE_CACHE=off (or 0) turns it off. Returns the folder."""
    path = path or os.environ.get('SPOT_COMPILE_CACHE') or \
        Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'spot-jax'
    if str(path).lower() in ('off', '0', 'false', 'no', 'none'):
        return None
    path = Path(path).expanduser()
    jax.config.update('jax_compilation_cache_dir', str(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)   # the steps, not every tiny op
    return path


def load_model(name: str, seed: int = 0):
    """--model: 'tiny' (random T5Config.tiny()), a hub id or a checkpoint directory -> (cfg, params)."""
    if name == 'tiny':
        cfg = t5_model.T5Config.tiny()
        return cfg, t5_model.init_params(jax.random.key(seed), cfg)
    return t5_model.load_checkpoint(name)


def main(argv=None):
    p = argparse.ArgumentParser(prog='spot.py', allow_abbrev=False, description=__doc__.split('\n')[0],
                                epilog='Any TrainConfig/PromptConfig field can be set as --field=value, '
                                       'e.g. --batch_size=8 --eval_every=100 --length=20.')
    sub = p.add_subparsers(dest='cmd', required=True)
    train, ev = sub.add_parser('train', allow_abbrev=False), sub.add_parser('eval', allow_abbrev=False)
    for q in (train, ev):
        q.add_argument('--model', required=True, help="hub id (google/t5-base-lm-adapt), directory, or 'tiny'")
        q.add_argument('--task', required=True, help='a task name of data.py')
        q.add_argument('--data', default=None, help='directory with the original task files (default: tfds)')
        q.add_argument('--vocab', default=None, help='SentencePiece model (default: data.load_vocab())')
        q.add_argument('--model-parallel', type=int, default=1, help="devices per 'model' mesh group")
        q.add_argument('--no-compile-cache', action='store_true',
                       help='do not keep compiled steps on disk (default: on, see enable_compile_cache)')
    train.add_argument('--init', default=None, choices=INITS, help='prompt initialisation (default sampled_vocab)')
    train.add_argument('--source-prompt', default=None, help='.npy [P,D] to start from: SPoT transfer')
    train.add_argument('--steps', type=int, default=None, help='default 2^18 (§2.1.4)')
    train.add_argument('--out', required=True, help='run directory')
    train.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.npz')
    ev.add_argument('--prompt', required=True, help='.npy [P,D]')
    ev.add_argument('--split', default='validation')
    args, rest = p.parse_known_args(argv)
    try:
        tc, rest = override(TrainConfig(), rest)
        pc, rest = override(PromptConfig(), rest)
    except ValueError as e:                       # a mistyped or out-of-range --field=value
        p.error(str(e))
    if rest:
        p.error(f'unrecognised {rest}: fields of TrainConfig/PromptConfig are set as --field=value')

    enable_compile_cache('off' if args.no_compile_cache else None)
    try:
        (evaluate_cli if args.cmd == 'eval' else train_cli)(args, tc, pc)
    # Bad input (a wrong path, a missing package, a task without a metric, a NaN loss): a message, no traceback.
    except (FloatingPointError, ValueError, KeyError, OSError, ImportError, NotImplementedError) as e:
        sys.exit(f'error: {e}')


def _setup(args, tc):
    import data
    cfg, frozen = load_model(args.model, tc.seed)
    mesh = make_mesh(args.model_parallel) if jax.device_count() > 1 or args.model_parallel != 1 else None
    return data, cfg, shard_params(mesh, frozen), data.load_vocab(args.vocab), mesh


def evaluate_cli(args, tc, pc):
    data, cfg, frozen, vocab, _ = _setup(args, tc)
    prompt = np.load(args.prompt)
    check_prompt(prompt, cfg.d_model, what=args.prompt)
    run = make_evaluator(args.task, frozen, cfg, vocab, tc, args.split, args.data)
    print(json.dumps(run(jnp.asarray(prompt, jnp.float32))))


def train_cli(args, tc, pc):
    tc = dataclasses.replace(tc, steps=tc.steps if args.steps is None else args.steps)   # checked before loading
    pc = dataclasses.replace(pc, init=args.init or ('file' if args.source_prompt else pc.init),
                             source=args.source_prompt or pc.source)
    data, cfg, frozen, vocab, mesh = _setup(args, tc)
    mixture = next((m for m in data.MIXTURES if m.lower() == args.task.lower()), None)   # e.g. --task GLUE
    tasks = data.MIXTURES[mixture] if mixture else (data.get_task(args.task).name,)
    task = data.get_task(tasks[0])
    if pc.init == 'class_labels' and (mixture or not task.output_labels):
        raise ValueError(f'{args.task} has no class labels: use --init text --text="..." (Lester: task words)')
    labels = [list(vocab.encode(x)) for x in task.output_labels] if pc.init == 'class_labels' else None
    text = list(vocab.encode(pc.text)) if pc.text else None
    prompt = init_prompt(jax.random.split(jax.random.key(tc.seed))[0], frozen, pc, labels, text)
    # Examples are read, formatted and tokenized per batch (data.train_source): memory O(batch), any size.
    sources = {t: data.train_source(t, vocab, tc.max_input_len, tc.max_target_len, args.data, tc.seed)
               for t in tasks}
    # What the run reads, so that --resume with other data (or another vocabulary) is refused (train_prompt's meta).
    # The data by content, not path: the same files in another folder resume; others are refused.
    reads = {'data': 'files' if args.data else 'tfds', 'vocab': vocab.fingerprint,
             'files': {t: data.data_fingerprint(t, 'train', args.data) for t in tasks}}
    if mixture:
        batches = lambda k: data.mixture_batches(sources, tc.batch_size, tc.seed, start=k)   # noqa: E731
    else:
        batches = lambda k: data.batches(sources[task.name], tc.batch_size, tc.seed, start=k)   # noqa: E731
    evaluator = make_evaluator(task.name, frozen, cfg, vocab, tc, data_dir=args.data) \
        if task.metrics and not mixture else None
    if evaluator is None:       # c4 (prefix LM) and the mixtures (SPoT's sources): no single validation metric
        print(f'{args.task}: no validation metric; prompt.npy will be the prompt after the last step')
    result = train_prompt(prompt, frozen, cfg, tc, batches, evaluator, args.out,
                          meta={'model': args.model, 'task': args.task, 'init': pc.init,
                                'prompt_config': dataclasses.asdict(pc), 'reads': reads},
                          resume=args.resume, mesh=mesh)
    print(f"best score {result['best_score']} at step {result['best_step']}; prompt in {args.out}/prompt.npy")


if __name__ == '__main__':
    main()
