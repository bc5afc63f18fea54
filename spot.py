"""SPoT: soft prompt tuning and transfer on a frozen T5 (Vu et al., ACL 2022; Lester et al., 2021), pure JAX.

The method, in reading order:
  PromptConfig, OptimizerConfig, TrainConfig   the recipe (§2.1.4, footnote 7; App. C for the inits)
  init_prompt    the starting prompt [P,D]; SPoT's transfer (§2) is init 'file': start from a source prompt
  prompt_loss    the frozen T5 reading [prompt; embedded input] (§2.1; Lester et al. §2)
  train_step     one Adafactor update of the prompt only (or of R runs' prompts [R,P,D] at once)
  train_prompt   the loop: best of evaluations every 500 steps (§2.1.4); the prompt after 10K steps is
                 the task embedding (§3.2, footnote 13); train_prompts: many runs sharing each step
  evaluate       greedy decoding or rank classification on validation -> task metric (make_evaluator); a
                 batch may mix prompts and tasks (§5: "mixed-task inference")
Then, in headed sections: performance (sub-batches); I/O: prompt files (.npy, the official code's T5X prompt
files, PEFT adapters: load_prompt, export_peft), checkpoints, the run folder (RunFolder: the one place where
multi-host shows, process 0 writing), sharding (make_mesh, shard_params, shard_batch, replicate); the CLI:
`python3 spot.py train|eval|export|plan -h` (override checks every config value a user sets).
"""
from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import data
import t5_model

INITS = ('sampled_vocab', 'class_labels', 'text', 'uniform', 'file')
REMATS = ('auto', 'none', 'dots', 'layer')   # TrainConfig.remat; t5_model.T5Config.remat without 'auto'


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    length: int = 100            # P: SPoT §2.1, "L = 100"
    # §2.1.4: source prompts start from sampled vocabulary (targets: App. C); see INITS
    init: str = 'sampled_vocab'
    vocab_pool: int = 5000       # §2.1.4 / Lester et al. 2021: the 5,000 most common tokens = ids < 5000
    # google-research/prompt-tuning, prompt_tuning/prompts.py: flax uniform(scale=0.5) = U[0, 0.5). We follow
    # the code that produced Lester et al.'s numbers, not their text's [-0.5, 0.5].
    uniform_scale: float = 0.5
    source: str = ''             # 'file': the source prompt (SPoT's transfer, §2), a file load_prompt reads
    text: str = ''               # 'text': its token embeddings fill the first rows (Lester: ReCoRD, WSC)


LM_ADAPT_CHECKPOINT_STEP = 1_100_000   # T5 1.1 (1M steps) + 100K LM-adaptation steps (Lester et al. §2.2)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adafactor's settings: the static argument of train_step (a change recompiles it, nothing else does)."""
    learning_rate: float = 0.3       # footnote 7; PT runs/prompt_finetune.gin: constant 0.3
    # Adafactor beta2 exponent: PT configs/models/t5_1_1_prompt.gin; Lester et al.
    decay_rate: float = 0.8
    # The official runs continue the checkpoint's step counter (prompt-tuning
    # configs/runs/prompt_finetune.gin: "TRAIN_STEPS ... includes pretrain steps"; models/t5_1_1_prompt.gin:
    # step_offset = 0), so Adafactor's decay 1 - t^-0.8 starts at t = 1.1M, the LM-adapted checkpoints' step
    # (t5_1_1_lm100k_*/checkpoint_1100000), not at 0.
    decay_offset: int = -LM_ADAPT_CHECKPOINT_STEP
    param_scale: bool = False        # footnote 7: "parameter scaling off"
    weight_decay: float = 1e-5       # footnote 7 (T5X: (1 - wd) * param, not scaled by the learning rate)
    clipping_threshold: float = 1.0  # T5X Adafactor default update clipping (t5x/adafactor.py)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # §2.1.4 "2^18 steps, following Raffel et al." (30K "-longer tuning"; §3: 100K)
    steps: int = 2**18
    batch_size: int = 32             # §2.1.4
    optimizer: OptimizerConfig = OptimizerConfig()   # CLI: --learning_rate=... etc. (override)
    z_loss: float = 1e-4             # PT t5_1_1_prompt.gin Z_LOSS
    # The run's dropout: train_prompt writes it into the model config (T5Config.dropout_rate) before the first
    # step, so the compiled step and the checkpoint see this one rate. §2.1.4 "dropout 0.1"; T5X
    # runs/finetune.gin.
    dropout: float = 0.1
    eval_every: int = 500            # §2.1.4: checkpoints every 500 steps, best validation score reported
    checkpoint_every: int = 500      # resumable checkpoint period (one is also written at every evaluation)
    embedding_step: int = 10_000     # §3.2 footnote 13: prompts after 10K steps are the task embeddings
    log_every: int = 100             # progress line period
    seed: int = 0                    # data order, prompt init and dropout keys
    # Not in the paper; the prompt-tuning demo scripts use {'inputs': 512, 'targets': 8}
    # (google-research/prompt-tuning, prompt_tuning/scripts/sst2-demo.sh).
    max_input_len: int = 512
    # 0 = the task's data.Task.target_len (8 for classification, as the PT demos)
    max_target_len: int = 0
    eval_batch_size: int = 64
    eval_limit: int = 0              # evaluate on the first N validation examples only (0 = all: the paper)
    # 'decode': T5 greedy decoding; 'rank': score every label (classification only)
    eval_method: str = 'decode'
    # Execution only (the same loss and gradient to float rounding; `spot.py plan` shows their memory):
    sub_batches: int = 0             # parallel sub-batches (sub_batch_count); 0 = auto: 2 on one CPU device
    # 'none', 'dots', 'layer' (T5Config.remat) or 'auto': the fastest that fits in the device's memory
    remat: str = 'auto'
    micro_batches: int = 0           # sequential micro-batches, gradients summed (micro_batched); 0 = auto


# ------------------------------------------------------------------------------------------------- the prompt
def init_prompt(key, params, pc: PromptConfig, label_ids=None, text_ids=None) -> jax.Array:
    """The starting prompt, float32 [P,D]. params: the frozen T5 (only its embedding [V,D] is read; 'file' and
    'uniform' need just its shape, so jax.eval_shape(...) params do). label_ids: token ids of each class label
    (class_labels); text_ids: token ids of the string (text); both without EOS."""
    emb = params['token_embedder']['embedding']
    (V, D), P = emb.shape, pc.length
    if pc.init == 'file':                        # SPoT §2: the target prompt starts as the source prompt
        return jnp.asarray(load_prompt(pc.source, D, P, what='source prompt'))
    if pc.init == 'uniform':
        return jax.random.uniform(key, (P, D), jnp.float32, 0.0, pc.uniform_scale)
    if pc.vocab_pool > V:                        # else jnp indexing would clamp ids >= V to the last row
        raise ValueError(f'vocab_pool {pc.vocab_pool} exceeds the model\'s vocabulary of {V} rows: '
                         f'pass --vocab_pool={V} (or fewer)')
    # §2.1.4 / Lester et al. 2021: T5's SentencePiece ids are ordered by frequency, so ids < 5000 are the
    # most common tokens; rows are drawn without replacement (PT from_sample_of_embeddings).
    ids = jax.random.choice(key, pc.vocab_pool, (P,), replace=False)
    prompt = jnp.asarray(emb[ids], jnp.float32)
    # App. C; Lester et al.: label i at position i, pieces mean-pooled
    if pc.init == 'class_labels':
        if len(label_ids) > P:
            raise ValueError(f'class_labels needs one prompt row per label, got {len(label_ids)} labels: use '
                             f'--length={len(label_ids)} or more')
        rows = [jnp.asarray(emb[np.asarray(p)], jnp.float32).mean(0) for p in label_ids]
        prompt = prompt.at[:len(rows)].set(jnp.stack(rows))
    elif pc.init == 'text':                      # a text longer than the prompt: its first P tokens
        rows = jnp.asarray(emb[np.asarray(text_ids)[:P]], jnp.float32)
        prompt = prompt.at[:len(rows)].set(rows)
    return prompt


# -------------------------------------------------------------------------------------- the loss and the step
def seq2seq_loss(logits, targets, z_loss: float):
    """Cross-entropy + z_loss * log(Z)^2 (T5X losses.py), averaged over non-pad target tokens. logits
    [B,T,V]."""
    # Normalisation: T5X sums over tokens (LOSS_NORMALIZING_FACTOR = None in prompt-tuning's
    # configs/models/t5_1_1_prompt.gin); we average. Adafactor divides each gradient by the root of its
    # running mean square, so a constant factor on the loss leaves the update unchanged (only batches with
    # different token counts weigh differently inside that running mean), and the mean keeps the printed loss
    # a per-token number comparable across batch sizes.
    log_z = jax.nn.logsumexp(logits, axis=-1)
    ce = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = (targets != t5_model.PAD_ID).astype(jnp.float32)
    return jnp.sum((ce + z_loss * log_z ** 2) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def prompt_loss(prompt, frozen, batch, cfg, dropout_key=None, z_loss=1e-4):
    """Loss of the frozen T5 (cfg) reading [prompt; embedded inputs] (Lester §2). prompt [P,D]; batch int32
    'inputs' [B,S], 'targets' [B,T]; dropout_key None = evaluation (no dropout)."""
    decoder_inputs = t5_model.shift_right(batch['targets'])
    logits = t5_model.forward(frozen, cfg, batch['inputs'], decoder_inputs, prompt=prompt,
                              dropout_key=dropout_key)
    return seq2seq_loss(logits, batch['targets'], z_loss)


def make_optimizer(opt: OptimizerConfig) -> optax.GradientTransformation:
    """Adafactor as in T5X (t5x/adafactor.py; our test checks the update against a transcription of it). The
    [P,D] prompt has P = 100 < 128 = min_dim_size_to_factor, so its second moment is unfactored, as in the
    official runs; no momentum."""
    return optax.adafactor(learning_rate=opt.learning_rate, decay_rate=opt.decay_rate,
                           decay_offset=opt.decay_offset, multiply_by_parameter_scale=opt.param_scale,
                           clipping_threshold=opt.clipping_threshold,
                           momentum=None, weight_decay_rate=opt.weight_decay or None, eps=1e-30)


def dropout_key(seed: int, step: int) -> jax.Array:
    """Dropout key of a training step: a pure function of (seed, step), so a resumed run draws the same
    masks."""
    return jax.random.fold_in(jax.random.split(jax.random.key(seed))[1], step)


@functools.partial(jax.jit, static_argnames=('cfg', 'opt', 'z_loss', 'sub_batches', 'micro_batches'),
                   donate_argnames=('prompt', 'opt_state'))
def train_step(prompt, opt_state, frozen, batch, key, cfg, opt: OptimizerConfig, z_loss=1e-4, sub_batches=1,
               micro_batches=1):
    """One prompt-tuning update with dropout cfg.dropout_rate. Only argument 0 (the prompt) is differentiated:
    no weight gradient is ever built, and `frozen` is a jit argument, not a constant baked into the program.
    sub_batches, micro_batches and cfg.remat: execution only (sub_batched, micro_batched,
    t5_model._scan_layers). Returns (prompt, opt_state, loss).
    Many runs, one step: a stack of R runs' prompts [R,P,D] with their optimizer states, batches [R,B,...] and
    dropout keys [R] gives each run's update as alone, and losses [R]; jax.vmap maps over the runs, the frozen
    weights unbatched (one copy, read once per step for all R: train_prompts)."""
    def update(prompt, opt_state, batch, key):
        loss_fn = prompt_loss if sub_batches == 1 else sub_batched(prompt_loss, sub_batches)
        grad_fn = micro_batched(jax.value_and_grad(loss_fn), micro_batches)
        loss, grad = grad_fn(prompt, frozen, batch, cfg, key, z_loss)
        updates, opt_state = make_optimizer(opt).update(grad, opt_state, prompt)
        return optax.apply_updates(prompt, updates), opt_state, loss
    return (jax.vmap(update) if prompt.ndim == 3 else update)(prompt, opt_state, batch, key)


# --------------------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One prompt-tuning run of train_prompts: its starting prompt [P,D], recipe, batches(start) (as
    train_prompt's), evaluator (None: no evaluation), folder and meta."""
    prompt: object
    tc: TrainConfig
    batches: object
    evaluator: object = None
    out_dir: object = 'runs/prompt'
    meta: dict | None = None


def train_prompt(prompt, frozen, cfg, tc: TrainConfig, batches, evaluator=None, out_dir='runs/prompt', *,
                 meta=None, resume=False, mesh=None, log=print) -> dict:
    """Prompt tuning (§2.1.4): tc.steps updates of `prompt` [P,D] on the frozen T5 (cfg, frozen).

    batches(start) -> iterator whose k-th item is batch start+k, a pure function of (seed, start+k)
    (data.batches). evaluator(prompt) -> metrics with 'score' (higher is better), run every tc.eval_every
    steps and at the end; the best prompt is out_dir/prompt.npy (without an evaluator, the last). The prompt
    after tc.embedding_step steps is the task embedding, prompt_step{N}.npy (§3.2). resume=True continues
    from out_dir/checkpoint.npz to the same bits as an uninterrupted run. What the folder holds and what a
    resume refuses: the section 'I/O: the run folder'. SIGINT/SIGTERM stop after the current step with a
    checkpoint (Interrupted); a non-finite loss or prompt raises FloatingPointError. Returns {'prompt',
    'opt_state', 'step', 'best_score', 'best_step', 'losses'}.
    """
    return train_prompts([Run(prompt, tc, batches, evaluator, out_dir, meta)], frozen, cfg, resume=resume,
                         mesh=mesh, log=log)[0]


def train_prompts(runs, frozen, cfg, *, resume=False, mesh=None, log=print, runs_per_step=0,
                  skip_held=False) -> list:
    """train_prompt for many runs (Run), runs_per_step of them (0: all) sharing every step: train_step on
    their stacked prompts [R,P,D], one copy of the frozen weights. Each run keeps its own seed, data order,
    dropout keys, evaluations and folder, and ends as it would alone (to float32 rounding; one run: to the
    bit); their batches are padded (masked) to the longest. A run that finishes or fails (non-finite: raised
    at the end) leaves the group, whose runs share the first run's compiled settings (TrainConfig's execution
    fields, dropout, optimizer, z_loss). skip_held: a run whose folder another process holds gets None."""
    R = runs_per_step or len(runs)
    log = log if jax.process_index() == 0 else (lambda *_: None)     # several processes: process 0 speaks
    return [res for i in range(0, len(runs), R)
            for res in _train_group(list(runs[i:i + R]), frozen, cfg, resume, mesh, log, skip_held)]


@dataclasses.dataclass(eq=False)
class _Going:
    """A run of _train_group as it goes: `done` steps taken; `state`, its checkpoint's (RunFolder.start)."""
    i: int                               # its place in the runs and results
    run: Run
    folder: RunFolder
    info: dict                           # what prompt.json records with each prompt
    state: dict
    prompt: object
    opt_state: object
    done: int
    losses: list = dataclasses.field(default_factory=list)
    data: object = None                  # its batches from `done` on (prefetch)


def _train_group(runs, frozen, cfg, resume, mesh, log, skip_held) -> list:
    tc = runs[0].tc
    if tc.remat == 'auto' or not tc.micro_batches:        # the CLI decided already (plan before loading)
        planned = resolve_memory(cfg, dataclasses.replace(tc, batch_size=tc.batch_size * len(runs)), frozen,
                                 tc.max_input_len, tc.max_target_len or DEFAULT_TARGET_LEN,
                                 runs[0].prompt.shape[0], mesh, log=log)[0]
        execution = {'remat': planned.remat, 'eval_batch_size': planned.eval_batch_size,
                     'micro_batches': 1 if tc.batch_size % planned.micro_batches else planned.micro_batches}
        runs = [dataclasses.replace(r, tc=dataclasses.replace(r.tc, **execution)) for r in runs]
        tc = runs[0].tc
    cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout, remat=tc.remat)
    step_settings = (cfg, tc.optimizer, tc.z_loss, sub_batch_count(tc), tc.micro_batches)
    results, failed, group = [None] * len(runs), [], []
    with contextlib.ExitStack() as held, stop_requests(log) as stop_signal:
        for i, run in enumerate(runs):
            folder = RunFolder(run.out_dir)
            try:
                folder.take(held, resume, log)
            except RunFolderInUse as e:
                if not skip_held:
                    raise
                log(f'skipped: {e}')
                continue
            info = {**(run.meta or {}), 'config': {'train': dataclasses.asdict(run.tc),
                                                   'model': dataclasses.asdict(cfg)}}
            prompt, opt_state, state = folder.start(run.prompt, run.tc, run_identity(cfg, frozen, run.meta),
                                                    info, resume, log)
            group.append(_Going(i, run, folder, info, state, prompt, opt_state, state['step']))
        frozen = shard_params(mesh, frozen)
        # a run stopped during the evaluation of its step does it now
        _evaluate_and_keep([g for g in group if g.state.get('eval_pending') and g.run.evaluator], log)
        active = [g for g in group if g.done < g.run.tc.steps]
        for g in active:
            g.data = prefetch(g.run.batches(g.done))
        clock, stack = Clock(), None
        while active:
            if stack is None:                    # the group (re)formed: one state, runs stacked on axis 0
                states = [(g.prompt, g.opt_state) for g in active]
                stack = replicate(mesh, states[0] if len(states) == 1 else
                                  jax.tree.map(lambda *xs: jnp.stack(xs), *states))
            batch = _pad_stack([{n: v for n, v in next(g.data).items() if n in ('inputs', 'targets')}
                                for g in active])
            keys = jnp.stack([dropout_key(g.run.tc.seed, g.done) for g in active])
            if len(active) == 1:                 # one run: its batch [B,...] and key, no runs axis
                batch, keys = jax.tree.map(lambda x: x[0], (batch, keys))
            compiles, t = _compiled_steps(), time.perf_counter()
            if clock.steps == 0:
                log(f"step of {len(active)} run{'s' * (len(active) > 1)}, inputs "
                    f"{'x'.join(map(str, batch['inputs'].shape))}, targets {batch['targets'].shape[-1]}: "
                    f'compiling or loading it from the compile cache ...')
            *stack, losses = train_step(*stack, frozen, shard_batch(mesh, batch, len(active) > 1), keys,
                                        *step_settings)
            losses, clock.steps = np.atleast_1d(np.asarray(losses, np.float64)).tolist(), clock.steps + 1
            if _compiled_steps() != compiles or clock.steps == 1:
                log(f"{'found ' * (_compiled_steps() == compiles)}compiled, first step done in "
                    f'{time.perf_counter() - t:.1f} s')
                clock.restart()                  # steps/s leaves out the compile
            signum, evaluate_now, left, line, wrote = stop_signal(), [], [], False, False
            for j, (g, loss) in enumerate(zip(active, losses)):
                t, done, folder = g.run.tc, g.done + 1, g.folder
                prompt, opt_state = stack if len(active) == 1 else jax.tree.map(lambda x: x[j], stack)
                evaluated = g.run.evaluator is not None and (done % t.eval_every == 0 or done == t.steps)
                checkpoint = evaluated or done % t.checkpoint_every == 0 or done == t.steps or signum
                try:
                    check_finite(loss, prompt if checkpoint or done == t.embedding_step else None, done,
                                 folder.ckpt, g.state)
                except FloatingPointError as e:
                    failed.append(e)
                    log(f'{folder.out}: {e}')
                    continue
                g.losses.append(loss)
                if done % t.log_every == 0 or done == t.steps:
                    line = True
                    folder.history({'step': done, 'loss': loss, 'steps_per_s': clock.rate(),
                                    'time': time.time()})
                if done == t.embedding_step:                # §3.2: the task embedding
                    folder.save_prompt(f'prompt_step{done}', prompt, {**g.info, 'step': done, 'score': None})
                if checkpoint:          # written before evaluating: an evaluator that fails loses no training
                    g.state.update(step=done, data_position=done, eval_pending=evaluated)
                    folder.checkpoint(prompt, opt_state, g.state)
                    wrote = True
                g.prompt, g.opt_state, g.done = prompt, opt_state, done
                (evaluate_now if evaluated else []).append(g)
                (left if done < t.steps else []).append(g)
            _evaluate_and_keep(evaluate_now, log)   # §2.1.4: keep the prompt with the best score
            if line or time.perf_counter() - clock.line >= 30:
                clock.log(log, active[0], losses)
            if wrote:
                clock.restart()                  # steps/s leaves out checkpoints and evaluations
            if signum and left:
                raise Interrupted(signum, left[0].done, left[0].folder.ckpt)
            if left != active:                   # a run finished or failed: the group re-forms
                stack, active = None, left
        for g in group:
            if g.run.evaluator is None and g.state['step'] == g.run.tc.steps:
                g.folder.save_prompt('prompt', g.prompt, {**g.info, 'step': g.state['step'], 'score': None})
            results[g.i] = {'prompt': g.prompt, 'opt_state': g.opt_state, 'losses': g.losses,
                            **{k: g.state[k] for k in ('step', 'best_score', 'best_step')}}
    if failed:
        raise failed[0]
    return results


def _pad_stack(batches) -> dict:
    """Runs' batches {'inputs' [B,S], 'targets' [B,T]} -> [R,B,S'], [R,B,T'], masked pad to the longest."""
    width = {name: max(b[name].shape[1] for b in batches) for name in ('inputs', 'targets')}
    return {name: np.stack([np.pad(np.asarray(b[name]), ((0, 0), (0, w - b[name].shape[1])))
                            for b in batches]) for name, w in width.items()}


def _compiled_steps() -> int:     # programs train_step compiled (or loaded from the cache) so far
    return getattr(train_step, '_cache_size', lambda: 0)()


class Clock:
    """Progress lines: steps/s (leaving out compiles, checkpoints and evaluations) and the first run's ETA."""

    def __init__(self):
        self.steps, self.line = 0, time.perf_counter()
        self.restart()

    def restart(self):
        self.window = (time.perf_counter(), self.steps)

    def rate(self) -> float:
        since, steps = self.window
        return (self.steps - steps) / max(time.perf_counter() - since, 1e-9)

    def log(self, log, g, losses):
        rate = self.rate()
        eta = int((g.run.tc.steps - g.done) / rate) if rate else 0
        log(f"step {g.done}/{g.run.tc.steps}  loss {' '.join(f'{x:.4f}' for x in losses)}  {rate:.2f} "
            f'steps/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}')
        self.line = time.perf_counter()


def _evaluate_and_keep(group, log):
    """§2.1.4: evaluate the runs' prompts (score_together); keep each one that is its run's best so far."""
    if not group:
        return
    scores = score_together([g.run.evaluator for g in group], [g.prompt for g in group])
    for g, metrics in zip(group, scores):
        folder, state, done = g.folder, g.state, g.state['step']
        log(f'step {done}  eval {_json(metrics, None).decode()}' + (f'  ({folder.out.name})' if len(group) > 1
                                                                     else ''))
        folder.history({'step': done, 'eval': metrics, 'time': time.time()})
        score = float(metrics['score'])             # a NaN score (Pearson of constants) is never the best
        score = score if math.isfinite(score) else -math.inf
        if state['best_score'] is None or score > state['best_score']:
            state.update(best_score=score, best_step=done)
            folder.save_prompt('prompt', g.prompt, {**g.info, 'step': done, 'score': metrics['score'],
                                                   'metrics': metrics})
        state['eval_pending'] = False
        folder.checkpoint(g.prompt, g.opt_state, state)


def prefetch(batches, depth: int = 2):
    """The items of `batches`, made `depth` ahead on a thread (the host prepares batch k+1 while the device
    runs step k); an error making a batch is raised here when that batch is reached."""
    items, end = iter(batches), object()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ahead = collections.deque(pool.submit(next, items, end) for _ in range(depth))
        while (item := ahead.popleft().result()) is not end:
            ahead.append(pool.submit(next, items, end))
            yield item


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(frozen, cfg, prompt, inputs, vocab, *, method='decode', choices=None, max_target_len=8,
             batch_size=64, mesh=None, prompt_ids=None, progress=None) -> list[str]:
    """Predicted strings for inputs (lists of token ids, unpadded), in their order, without dropout.
    'decode': greedy decoding (T5); 'rank': rank classification, the string of choices[i] (example i's
    candidates: its task's labels, ReCoRD's entities) whose target has the highest log-likelihood.
    Examples are sorted by length and each batch padded to the bucket of its longest (data.bucket_length):
    few compiled shapes, and short inputs never pay for the longest one. With a mesh each batch is split over
    'data' and the predictions gathered (every process returns all). progress(done, total) after each batch.
    Mixed tasks (SPoT §5: one frozen model serves many prompts): prompt a stack [K,P,D], prompt_ids[i] the
    prompt of example i, and max_target_len one per prompt; each prediction is the one of its prompt alone
    (to float32 rounding of the scores)."""
    ids = np.zeros(len(inputs), np.int64) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
    lens = np.broadcast_to(max_target_len, (len(prompt) if prompt_ids is not None else 1,))
    T = int(lens.max())
    if method == 'rank':         # each candidate cut to its task's target length; a label set tokenized once
        tokens = functools.cache(lambda c, t: data.token_ids(vocab, c, t))
        targets = [tokens(tuple(c), int(lens[k])) for c, k in zip(choices, ids)]
    order, cap = np.argsort([len(r) for r in inputs], kind='stable'), max(map(len, inputs), default=1)
    stack = None if prompt_ids is None else np.asarray(prompt, np.float32)   # one host copy, not per batch
    preds = [None] * len(inputs)
    devices = mesh.shape['data'] if mesh is not None else 1
    for i in range(0, len(inputs), batch_size):
        chunk = order[i:i + batch_size]
        # Zero rows pad a last partial batch to the power of two that holds it (a multiple of the 'data'
        # devices), not to batch_size: one shape more to compile, and 8 examples of 64 cost 8 rows, not 64.
        n = 1 << (len(chunk) - 1).bit_length()                  # the power of two >= len(chunk)
        n = min(batch_size, -(-n // devices) * devices)          # rounded up to a multiple of devices
        x = spread_rows(mesh, data.pad_rows([inputs[j] for j in chunk] + [[]] * (n - len(chunk)),
                                            data.bucket_length(max(len(inputs[j]) for j in chunk), cap)))
        k = np.concatenate([ids[chunk], np.zeros(n - len(chunk), np.int64)])     # each row's prompt
        p = prompt if prompt_ids is None else spread_rows(mesh, stack[k])
        if method == 'decode':
            out = gather(t5_model.greedy_decode(frozen, cfg, x, p, max_len=T)).tolist()
            out = [row[:lens[c]] for row, c in zip(out, k)]     # each task's own target length
            out = [vocab.decode(row[:row.index(t5_model.EOS_ID)] if t5_model.EOS_ID in row else row)
                   for row in out]                                # tokens before EOS (0 after it)
        else:                                         # candidate c of every row at once; -inf past its last
            C = max(len(choices[j]) for j in chunk)
            y = [data.pad_rows([targets[j][c] if c < len(choices[j]) else [] for j in chunk] + [[]] *
                               (n - len(chunk)), T) for c in range(C)]
            scores = np.stack([gather(t5_model.score_targets(frozen, cfg, x, spread_rows(mesh, yc), p))
                               for yc in y], axis=1)
            out = [choices[j][int(np.argmax(np.where(np.arange(C) < len(choices[j]), s, -np.inf)))]
                   for j, s in zip(chunk, scores)]
        for j, pred in zip(chunk, out):
            preds[j] = pred
        if progress is not None:
            progress(min(i + batch_size, len(inputs)), len(inputs))
    return preds


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """make_evaluator's scorer of one task's split: evaluator(prompt) -> data.score dict (metrics x100,
    'score'). score_together scores several of them (the runs of one group, or many prompts) in shared
    batches."""
    task_name: str
    examples: list
    inputs: list                     # token ids per example, unpadded
    label_names: tuple
    max_target_len: int
    method: str
    batch_size: int
    frozen: object
    cfg: object
    vocab: object
    mesh: object = None
    progress: object = None          # progress(done, total) after each batch (progress_printer)

    def __call__(self, prompt):
        return score_together([self], [prompt])[0]


def score_together(evaluators, prompts) -> list[dict]:
    """evaluators[i](prompts[i]) for every i; the Evaluators of one model and method share batches (evaluate
    with prompt_ids), any other callable runs alone."""
    results, groups = [None] * len(prompts), {}
    for i, ev in enumerate(evaluators):
        if isinstance(ev, Evaluator):
            groups.setdefault((id(ev.frozen), ev.cfg, ev.method, ev.batch_size, id(ev.mesh), id(ev.vocab)),
                              []).append(i)
        else:
            results[i] = ev(prompts[i])
    for members in groups.values():
        evs = [evaluators[i] for i in members]
        first, ids = evs[0], np.concatenate([np.full(len(ev.inputs), j) for j, ev in enumerate(evs)])
        preds = evaluate(first.frozen, first.cfg, jnp.stack([jnp.asarray(prompts[i]) for i in members]),
                         [r for ev in evs for r in ev.inputs], first.vocab, method=first.method,
                         choices=[ev.label_names for ev in evs for _ in ev.inputs],
                         max_target_len=[ev.max_target_len for ev in evs], batch_size=first.batch_size,
                         mesh=first.mesh, prompt_ids=ids, progress=first.progress)
        for j, (i, ev) in enumerate(zip(members, evs)):
            results[i] = data.score(ev.task_name, ev.examples, [p for p, c in zip(preds, ids) if c == j])
    return results


def make_evaluator(task_name, frozen, cfg, vocab, tc: TrainConfig, split='validation', data_dir=None,
                   mesh=None, progress=None) -> Evaluator:
    """The evaluator of train_prompt: prompt -> data.score(...) dict (metrics x100, 'score') on the task's
    `split`. progress: evaluate's."""
    task = data.get_task(task_name)
    examples = data.load_examples(task_name, split, data_dir)[:tc.eval_limit or None]
    texts = [t['inputs'] for t in data.text_pairs(task_name, examples)]
    # fails now, not at the first evaluation, if a metric cannot run
    data.score(task_name, examples[:1], [''])
    if tc.eval_method == 'rank' and not task.output_labels:
        raise ValueError(f"eval method 'rank' needs a classification task with label names; "
                         f"{task.name}'s targets are not a fixed set of label strings: "
                         f"use --eval_method=decode")
    return Evaluator(task_name, examples, data.token_ids(vocab, texts, tc.max_input_len), task.output_labels,
                     tc.max_target_len or task.target_len, tc.eval_method, tc.eval_batch_size, frozen, cfg,
                     vocab, mesh, progress)


# ----------------------------------------------------------------------- performance: sub- and micro-batches
# Both wrappers compute loss(batch) and its gradient as k parts (rows i::k), their mean losses weighted by
# target-token counts: the same loss, gradient (to float rounding) and dropout masks for every k.
# - sub_batched: k independent parts in one program, which XLA:CPU runs on different cores at once (README,
#   Speed: k = 2; 4 was no faster). All parts' activations are alive together. On accelerators k = 1.
# - micro_batched: k parts one after another (lax.scan), one part's activations alive at a time: memory falls
#   with k, for the same FLOPs (spot.py plan picks k).
def sub_batch_count(tc: TrainConfig) -> int:
    """train_step's k: tc.sub_batches, or at 0 2 on one CPU device, else 1."""
    return tc.sub_batches or (2 if jax.default_backend() == 'cpu' and jax.device_count() == 1 else 1)


def _per_example_keys(key, B):       # one dropout key per example (or the [B] keys a caller split)
    return jax.random.split(key, B) if key.ndim == 0 else key


def sub_batched(loss_fn, k: int):
    """loss_fn(prompt, frozen, batch, cfg, key, z_loss) computed as gcd(k, B) sub-batches (see above)."""
    def loss(prompt, frozen, batch, cfg, key, z_loss):
        B = batch['targets'].shape[0]
        n_sub = math.gcd(k, B)
        if n_sub == 1:
            return loss_fn(prompt, frozen, batch, cfg, key, z_loss)
        keys, total, tokens = _per_example_keys(key, B), 0.0, 0.0
        for i in range(n_sub):
            sub = {name: batch[name][i::n_sub] for name in ('inputs', 'targets')}
            n = jnp.sum(sub['targets'] != t5_model.PAD_ID).astype(jnp.float32)
            total += loss_fn(prompt, frozen, sub, cfg, keys[i::n_sub], z_loss) * n
            tokens += n
        return total / jnp.maximum(tokens, 1.0)
    return loss


def micro_batched(value_and_grad_fn, k: int):
    """value_and_grad_fn(prompt, frozen, batch, cfg, key, z_loss) -> (loss, grad) as k sequential parts (see
    above; k divides B)."""
    if k == 1:
        return value_and_grad_fn

    def run(prompt, frozen, batch, cfg, key, z_loss):
        B = batch['targets'].shape[0]

        def parts(x):                 # [B, ...] -> [k, B/k, ...]; part i = rows i::k
            return x.reshape(B // k, k, *x.shape[1:]).swapaxes(0, 1)

        def body(acc, part):
            sub, keys = part
            n = jnp.sum(sub['targets'] != t5_model.PAD_ID).astype(jnp.float32)
            loss, grad = value_and_grad_fn(prompt, frozen, sub, cfg, keys, z_loss)
            return (acc[0] + n * loss, acc[1] + n * grad, acc[2] + n), None
        sub = {name: parts(batch[name]) for name in ('inputs', 'targets')}
        zero = jnp.zeros((), jnp.float32)
        (total, grad, tokens), _ = jax.lax.scan(body, (zero, jnp.zeros_like(prompt), zero),
                                                (sub, parts(_per_example_keys(key, B))))
        tokens = jnp.maximum(tokens, 1.0)
        return total / tokens, grad / tokens
    return run


# ---------------------------------------------------------------------------- performance: the memory plan
# Before any weight is read, the step and the evaluation are compiled from shapes and XLA says what they need
# per device (memory_analysis()). At 'auto', remat and micro_batches take the first PLAN_ORDER setting that
# fits, by cost: 'dots' recomputes attention and elementwise ops, 'layer' the whole forward (+1/3 FLOPs);
# micro-batches cost smaller matmuls. On a CPU 'dots' comes first: 0.83x (Small), 0.85x (Base) the step time
# of no remat, whose backward pass reads every layer's float32 attention maps back (README, Speed).
PLAN_ORDER = (('none', 1), ('none', 2), ('dots', 1), ('dots', 2), ('layer', 1), ('layer', 2), ('layer', 4),
              ('layer', 8), ('layer', 16), ('layer', 32), ('layer', 64), ('layer', 128))
GiB = 2 ** 30


def plan_order() -> tuple:
    cpu = jax.default_backend() == 'cpu'
    return tuple(sorted(PLAN_ORDER, key=lambda setting: cpu and setting[0] != 'dots'))


def memory_budget(device_memory_gib: float | None = None) -> tuple[float, str]:
    """(bytes a run may use per device, how that was found): the allocator's limit, or a size given or a CPU's
    RAM at XLA_PYTHON_CLIENT_MEM_FRACTION (0.75: JAX's share of a GPU, jax.readthedocs.io GPU memory)."""
    fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75))
    if device_memory_gib:
        return device_memory_gib * GiB * fraction, \
            f'{fraction:.0%} of --device-memory {device_memory_gib:g} GiB'
    stats = jax.local_devices()[0].memory_stats() or {}
    if 'bytes_limit' in stats:
        return float(stats['bytes_limit']), f'the allocator limit of {jax.local_devices()[0].device_kind}'
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return ram * fraction, f'{fraction:.0%} of this machine\'s {ram / GiB:.0f} GiB RAM (CPU)'


def _shapes_on(mesh, tree, spec=None):
    """tree's ShapeDtypeStructs placed as a run places them (spec None: param_shardings; mesh None: not)."""
    if mesh is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    places = param_shardings(mesh, tree) if spec is None else \
        jax.tree.map(lambda _: NamedSharding(mesh, spec), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, places)


def _shard_shape(x) -> tuple:       # what one device holds of a (placed) ShapeDtypeStruct
    return tuple(x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape)


def _device_bytes(tree) -> int:
    return sum(math.prod(_shard_shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compiled_bytes(lowered, weights) -> tuple[dict, float]:
    """({'temporaries', 'peak'} bytes, compile seconds) of a lowered program. XLA:CPU's float32 copy of each
    bfloat16 weight of a scanned stack (its matmuls run in float32; a GPU's do not) is left out."""
    t = time.perf_counter()
    compiled = lowered.compile()
    seconds, m = time.perf_counter() - t, compiled.memory_analysis()
    copies = 0
    if jax.default_backend() == 'cpu' and any(x.dtype != jnp.float32 for x in jax.tree.leaves(weights)):
        shapes = {_shard_shape(x) for x in jax.tree.leaves(weights) if x.dtype != jnp.float32}
        for match in re.finditer(r'= f32\[([\d,]*)\]\{[^}]*\} convert\(', compiled.as_text()):
            shape = tuple(int(n) for n in match.group(1).split(',') if n)
            copies += 4 * math.prod(shape) if shape in shapes else 0
    temporaries = m.temp_size_in_bytes - copies
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + temporaries
    return {'temporaries': temporaries, 'peak': peak}, seconds


def plan_step(cfg, tc: TrainConfig, frozen, remat: str, micro_batches: int, input_len: int, target_len: int,
              prompt_len: int, mesh=None) -> dict:
    """Compile train_step for one setting from shapes (frozen: arrays or ShapeDtypeStructs): its bytes."""
    cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout, remat=remat)
    prompt = jax.ShapeDtypeStruct((prompt_len, cfg.d_model), jnp.float32)
    opt_state = jax.eval_shape(make_optimizer(tc.optimizer).init, prompt)
    state = _shapes_on(mesh, (prompt, opt_state), PartitionSpec())
    batch = _shapes_on(mesh, {'inputs': jax.ShapeDtypeStruct((tc.batch_size, input_len), jnp.int32),
                              'targets': jax.ShapeDtypeStruct((tc.batch_size, target_len), jnp.int32)},
                       PartitionSpec('data'))
    weights = _shapes_on(mesh, frozen)
    lowered = train_step.lower(*state, weights, batch, dropout_key(0, 0), cfg, tc.optimizer, tc.z_loss,
                               sub_batch_count(tc), micro_batches)
    got, compile_s = _compiled_bytes(lowered, weights)
    return {**got, 'remat': remat, 'micro_batches': micro_batches, 'compile_s': compile_s,
            'weights': _device_bytes(weights), 'prompt_optimizer': _device_bytes(state)}


def plan_eval(cfg, tc: TrainConfig, frozen, input_len: int, target_len: int, prompt_len: int,
              mesh=None) -> dict:
    """Compile the evaluation (greedy decoding, or one rank-classification score) at eval_batch_size."""
    B, prompt = tc.eval_batch_size, jax.ShapeDtypeStruct((prompt_len, cfg.d_model), jnp.float32)
    rows = _shapes_on(mesh, jax.ShapeDtypeStruct((B, input_len), jnp.int32), PartitionSpec('data'))
    weights = _shapes_on(mesh, frozen)
    if tc.eval_method == 'decode':
        lowered = t5_model.greedy_decode.lower(weights, cfg, rows, prompt, max_len=target_len)
    else:
        targets = _shapes_on(mesh, jax.ShapeDtypeStruct((B, target_len), jnp.int32), PartitionSpec('data'))
        lowered = t5_model.score_targets.lower(weights, cfg, rows, targets, prompt)
    got, compile_s = _compiled_bytes(lowered, weights)
    return {**got, 'compile_s': compile_s}


def memory_plan(cfg, tc: TrainConfig, frozen, *, input_len: int, target_len: int, prompt_len: int, mesh=None,
                device_memory_gib: float | None = None, log=None) -> dict:
    """tc.remat / tc.micro_batches, or at 'auto' / 0 the first PLAN_ORDER setting that fits memory_budget; the
    evaluation's batch halves until it fits. Bytes per device ('weights', 'prompt_optimizer', 'temporaries',
    'peak', 'budget'), 'remat', 'micro_batches', 'eval_batch_size', 'fits', 'compile_s', 'tried'."""
    budget, source = memory_budget(device_memory_gib)
    data_devices = mesh.shape['data'] if mesh is not None else 1
    order = [(r, m) for r, m in plan_order() if tc.remat in ('auto', r) and tc.micro_batches in (0, m)]
    if not order:                        # micro_batches that PLAN_ORDER does not list (3): each remat with it
        remats = dict.fromkeys(r for r, _ in plan_order() if tc.remat in ('auto', r))
        order = [(r, tc.micro_batches) for r in remats]
    order = [(r, m) for r, m in order if tc.batch_size % (m * data_devices) == 0] or order[:1]
    tried, step = [], None
    weights = _device_bytes(_shapes_on(mesh, frozen))
    if weights > budget:                 # no setting helps: say so without compiling
        return {'weights': weights, 'prompt_optimizer': 0, 'temporaries': None, 'step_peak': None,
                'eval_peak': None, 'peak': weights, 'budget': budget, 'budget_source': source, 'fits': False,
                'remat': None, 'micro_batches': None, 'eval_batch_size': None, 'compile_s': 0.0, 'tried': []}
    for remat, m in order:
        # temporaries at most fall as 1/micro_batches: skip a setting that cannot fit by a measured one
        if any(t['remat'] == remat and t['weights'] + t['temporaries'] * t['micro_batches'] / m > budget
               for t in tried) and (remat, m) != order[-1]:
            continue
        step = plan_step(cfg, tc, frozen, remat, m, input_len, target_len, prompt_len, mesh)
        tried.append(step)
        if log:
            log(f'  plan: remat {remat}, micro_batches {m}: step {step["peak"] / GiB:.2f} GiB '
                f'(compile {step["compile_s"]:.1f} s)')
        if step['peak'] <= budget or step['weights'] + step['prompt_optimizer'] > budget:
            break                        # fits; or the weights alone do not: no setting helps
    eval_batch_size = tc.eval_batch_size  # predictions do not depend on it
    while True:
        ev = plan_eval(cfg, dataclasses.replace(tc, eval_batch_size=eval_batch_size), frozen, input_len,
                       target_len, prompt_len, mesh=mesh)
        if ev['peak'] <= budget or eval_batch_size <= data_devices or eval_batch_size % 2:
            break
        eval_batch_size //= 2
    peak = max(step['peak'], ev['peak'])
    return {'weights': step['weights'], 'prompt_optimizer': step['prompt_optimizer'],
            'temporaries': step['temporaries'], 'step_peak': step['peak'], 'eval_peak': ev['peak'],
            'peak': peak, 'budget': budget, 'budget_source': source, 'fits': peak <= budget,
            'remat': step['remat'], 'micro_batches': step['micro_batches'],
            'eval_batch_size': eval_batch_size,
            'compile_s': sum(t['compile_s'] for t in tried) + ev['compile_s'], 'tried': tried}


DEFAULT_TARGET_LEN = 8   # classification targets, the PT demos' {'targets': 8} (data.Task.target_len)


def rough_step_bytes(cfg, tc: TrainConfig, frozen, input_len: int, target_len: int, prompt_len: int) -> float:
    """An upper bound on the step's bytes per device without remat: the weights, and per layer and example at
    most 16 [S,D], 4 [S,F] and 4 [N,S,S] float32 activations; it skips compiling a plan that cannot matter."""
    S, L = input_len + prompt_len, cfg.num_layers + cfg.num_decoder_layers
    weights = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(frozen))
    per_example = S * (16 * cfg.d_model + 4 * cfg.d_ff) * 4 + 4 * cfg.num_heads * S * S * 4
    return weights + tc.batch_size * L * per_example + tc.batch_size * target_len * cfg.vocab_size * 4 * 4


def resolve_memory(cfg, tc: TrainConfig, frozen, input_len, target_len, prompt_len, mesh=None,
                   device_memory_gib=None, log=print) -> tuple[TrainConfig, dict | None]:
    """(tc with remat and micro_batches decided, memory_plan's plan or None: without compiling, plan_order()'s
    first when rough_step_bytes is under a quarter of the budget)."""
    budget = memory_budget(device_memory_gib)[0]
    if rough_step_bytes(cfg, tc, frozen, input_len, target_len, prompt_len) < budget / 4:
        return dataclasses.replace(tc, remat=plan_order()[0][0] if tc.remat == 'auto' else tc.remat,
                                   micro_batches=tc.micro_batches or 1), None
    plan = memory_plan(cfg, tc, frozen, input_len=input_len, target_len=target_len, prompt_len=prompt_len,
                       mesh=mesh, device_memory_gib=device_memory_gib)
    if plan['remat'] is None:            # the weights alone do not fit
        return tc, plan
    log(f"memory plan: remat {plan['remat']}, micro_batches {plan['micro_batches']}, eval_batch_size "
        f"{plan['eval_batch_size']}: {plan['peak'] / GiB:.2f} GiB per device of {plan['budget'] / GiB:.2f} "
        f"({plan['budget_source']})")
    return dataclasses.replace(tc, remat=plan['remat'], micro_batches=plan['micro_batches'],
                               eval_batch_size=plan['eval_batch_size']), plan


# ------------------------------------------------------------------------------------------ I/O: prompt files
# A prompt [P, D] travels as .npy (ours, Google's released prompts); as the official code's T5X runs write it,
# numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt, np.save format without an extension
# (google-research/prompt-tuning, prompt_tuning/train/utils.py, save_numpy); or as a PEFT adapter folder
# (export_peft). load_prompt reads all three.
T5X_PROMPT = 'encoder.prompt.prompt.prompt'
PEFT_CONFIG, PEFT_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'   # peft/utils/constants.py


def check_prompt(prompt, d_model: int | None, length: int | None = None, what: str = 'prompt'):
    """Refuse, in one line naming `what`, a prompt that is not a finite float [P >= 1 (= length), d_model]."""
    shape = tuple(prompt.shape)
    if len(shape) != 2:
        need = '' if d_model is None else f', and this model needs D = d_model {d_model}'
        problem = f'has shape {shape}: a prompt is a 2-D array [P, D]{need}; save one prompt per .npy'
    elif shape[0] == 0:
        problem = f'has shape {shape}: no rows, an empty prompt (P = 0); use one with at least one row'
    elif d_model is not None and shape[1] != d_model:
        problem = (f'has shape {shape}: width {shape[1]} but the model has d_model {d_model}: use a prompt '
                   f'tuned on a model of that width')
    elif length is not None and shape[0] != length:
        problem = f'has {shape[0]} rows but PromptConfig.length is {length}: pass --length={shape[0]}'
    elif not jnp.issubdtype(prompt.dtype, jnp.floating):       # np.save writes bfloat16 as 2 raw bytes: V2
        problem = f'has dtype {prompt.dtype}: a prompt holds real (float) values (cast bfloat16 to float32)'
    elif not np.isfinite(np.asarray(prompt, np.float32)).all():
        problem = 'holds NaN or inf values: it comes from a diverged run; use an earlier prompt'
    else:
        return
    raise ValueError(f'{what} {problem}')


def load_prompt(path, d_model: int | None = None, length: int | None = None, what='prompt') -> np.ndarray:
    """A prompt file (a .npy, a T5X prompt file or its checkpoint_<step> folder, a PEFT adapter folder or its
    .safetensors, a run folder) -> float32 [P, D], checked by check_prompt; a bad file raises one line."""
    path, label = Path(path), f'{what} {path}'
    if (path / PEFT_CONFIG).is_file() or path.suffix == '.safetensors' and path.is_file():
        folder = path if path.is_dir() else path.parent
        prompt, base = _read_peft(folder, label, path if path.is_file() else folder / PEFT_WEIGHTS)
        label += f' (a PEFT prompt-tuning adapter for {base})'
    elif (path / T5X_PROMPT).is_file():
        prompt = _read_npy(path / T5X_PROMPT, f'{label}/{T5X_PROMPT}')
    elif path.is_dir() and is_run_folder(path):
        prompt = _read_npy(run_prompt_file(path), f'{label}/prompt.npy')
    elif path.is_dir():
        raise ValueError(f"{label} is a folder without {PEFT_CONFIG} (PEFT), {T5X_PROMPT} (T5X) "
                         f"or a run's prompt.npy")
    elif not path.is_file():
        raise FileNotFoundError(f'{label} does not exist')
    else:
        prompt = _read_npy(path, label)
    check_prompt(prompt, d_model, length, what=label)
    return np.asarray(prompt, np.float32)


def is_run_folder(folder: Path) -> bool:
    return any(run_file(f.name) for f in Path(folder).iterdir())


def run_prompt_file(folder: Path, embedding: bool = False) -> Path:
    """A run folder's prompt.npy (its best), or with embedding=True its task embedding prompt_step<N>.npy
    (§3.2; prompt.npy when it has none)."""
    steps = sorted(Path(folder).glob('prompt_step*.npy'), key=lambda f: int(re.sub(r'\D', '', f.stem) or 0))
    file = steps[0] if embedding and steps else Path(folder) / 'prompt.npy'
    if not file.is_file():
        raise FileNotFoundError(f'run folder {folder} holds no prompt.npy yet (its run has not evaluated or '
                                f'finished): wait for it, or pass one of its prompt_step<N>.npy')
    return file


def _read_npy(path: Path, label: str) -> np.ndarray:
    with open(path, 'rb') as f:
        head, problem = f.read(64), None
        if not head.startswith(b'\x93NUMPY'):
            text = all(32 <= b < 127 or b in b'\t\n\r' for b in head)
            kind = ('empty (0 bytes)' if not head else 'an .npz archive' if head.startswith(b'PK') else
                    'a Python pickle' if head[:1] == b'\x80' else 'a text file' if text else 'another format')
            problem = f'is {kind}, not a .npy: save the [P, D] prompt with np.save'
        else:
            f.seek(0)
            try:
                read = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            except ValueError as e:
                raise ValueError(f'cannot read {label}: its .npy header is damaged ({e})') from None
            have, need = path.stat().st_size - f.tell(), math.prod(shape) * dtype.itemsize
            problem = ('holds a pickled (object) array, not numbers' if dtype.hasobject else
                       f'is truncated: needs {need} bytes ({dtype} {shape}), holds {have}' if have < need
                       else None)
    if problem:
        raise ValueError(f'{label} {problem}')
    return np.load(path, allow_pickle=False)


def _read_peft(folder: Path, label: str, weights: Path):
    """(the encoder's prompt rows [P, D], the base model's name) of a PEFT prompt-tuning adapter for a T5."""
    try:
        c = json.loads((folder / PEFT_CONFIG).read_text())
    except FileNotFoundError:
        raise ValueError(f'{label} has no {PEFT_CONFIG} beside it: pass the folder PEFT wrote') from None
    except ValueError as e:
        raise ValueError(f'{label}: {folder / PEFT_CONFIG} is not valid JSON ({e})') from None
    kind, task = (c.get('peft_type'), c.get('task_type')) if isinstance(c, dict) else (None, None)
    if kind != 'PROMPT_TUNING':
        raise ValueError(f'{label} is a PEFT {kind} adapter, not prompt tuning (PromptTuningConfig)')
    if task != 'SEQ_2_SEQ_LM':
        model = 'a decoder-only model' if task == 'CAUSAL_LM' else 'a model that is not an encoder-decoder'
        raise ValueError(f'{label} is a PEFT prompt for {model} (task_type {task}), not a T5 (SEQ_2_SEQ_LM)')
    if not weights.is_file() and (folder / 'adapter_model.bin').is_file():    # PEFT before safetensors
        weights = folder / 'adapter_model.bin'
    if not weights.is_file():
        raise FileNotFoundError(f'{label} has no {PEFT_WEIGHTS}: copy the whole folder PEFT wrote')
    tensors = (t5_model._read_torch if weights.suffix == '.bin' else t5_model._read_safetensors)(weights)
    n, sub = c.get('num_virtual_tokens'), c.get('num_transformer_submodules') or 2
    rows = tensors.get('prompt_embeddings')
    if rows is None or not isinstance(n, int) or np.ndim(rows) != 2 or rows.shape[0] != n * sub:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f'{label}: {weights.name} should hold prompt_embeddings [{n} x {sub}, D]: {shapes}')
    return np.asarray(rows[:n]), c.get('base_model_name_or_path')     # the encoder reads the first n rows


def export_peft(prompt, cfg: t5_model.T5Config, out, base_model: str) -> Path:
    """Write prompt [P, D] as PEFT's save_pretrained writes a PromptTuningConfig(task_type=SEQ_2_SEQ_LM) on
    base_model (huggingface/peft v0.21.2: config.py, utils/other.py _prepare_prompt_learning_config): P x 2
    rows, the encoder's [:P] ours, the decoder's zeros (never read); a flock refuses a second export there."""
    prompt, out = np.asarray(prompt, np.float32), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = os.open(out, os.O_RDONLY)              # locked as an open folder: no lock file in the adapter
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f'{out} is being written by another export: pick a new --out') from None
        if (out / PEFT_CONFIG).exists() or (out / PEFT_WEIGHTS).exists():
            raise FileExistsError(f'{out} holds a PEFT adapter already: pick a new --out, or delete it first')
        P, D = prompt.shape
        config = {'auto_mapping': None, 'base_model_name_or_path': base_model, 'inference_mode': True,
                  'modules_to_save': None, 'num_attention_heads': cfg.num_heads, 'num_layers': cfg.num_layers,
                  'num_transformer_submodules': 2, 'num_virtual_tokens': P, 'peft_type': 'PROMPT_TUNING',
                  # no init runs: inference_mode skips it, and a trainable load replaces RANDOM's rows by ours
                  'prompt_tuning_init': 'RANDOM', 'prompt_tuning_init_text': None, 'revision': None,
                  'task_type': 'SEQ_2_SEQ_LM', 'token_dim': D, 'tokenizer_kwargs': None,
                  'tokenizer_name_or_path': None}
        from safetensors.numpy import save
        tensors = save({'prompt_embeddings': np.concatenate([prompt, np.zeros_like(prompt)])},
                       metadata={'format': 'pt'})
        _atomic(out / PEFT_WEIGHTS, lambda f: f.write(tensors))
        _atomic(out / PEFT_CONFIG, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()))
    finally:
        os.close(folder)                            # releases the lock
    return out


# ------------------------------------------------------------------------------------------- I/O: checkpoints
def _json(obj, indent=1, strict=True) -> bytes:
    """JSON of run metadata: numpy/jax numbers as Python's, other non-JSON values (a Path) as str. strict:
    NaN/inf (Pearson of constant predictions) -> null; the checkpoint keeps them (strict=False)."""
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
    """write(f) to path.tmp, then replace path: a reader (or a resume after a crash) sees old or new."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, prompt, opt_state, state: dict):
    """Everything a resume needs: prompt, optimizer leaves, and state (step = data position; seed = RNG)."""
    leaves = {f'opt_{i}': np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(opt_state))}
    text = np.array(_json(state, None, strict=False).decode())
    _atomic(path, lambda f: np.savez(f, prompt=np.asarray(prompt), state=text, **leaves))


def load_checkpoint(path: Path, optimizer):
    """(prompt, opt_state, state) of save_checkpoint's file; a damaged one raises ValueError naming it."""
    try:
        with np.load(path) as z:
            state, prompt = json.loads(str(z['state'])), jnp.asarray(z['prompt'])
            like, tree = jax.tree_util.tree_flatten(optimizer.init(prompt))
            leaves = [jnp.asarray(z[f'opt_{i}']) for i in range(len(like))]
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:   # truncated, garbage, ...
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}), so this run '
                         f'cannot resume. Its best prompt so far stays in {path.parent}/prompt.npy: '
                         f'keep that folder as it is and start a new run with another --out') from None
    return prompt, jax.tree_util.tree_unflatten(tree, leaves), state


# ----------------------------------------------------------- I/O: the run folder (train_prompt's bookkeeping)
# A run writes only these names in its folder (each through `<name>.tmp`, see _atomic), and leaves every other
# file there untouched. A file of one of these names that a run did not write (a user's prompt.json, run.lock)
# is refused, never replaced.
RUN_FILES = ('checkpoint.npz', 'prompt.npy', 'prompt.json', 'metrics.jsonl')   # + prompt_step<N>.npy/.json


def run_file(name: str) -> bool:       # RUN_FILES and the task embedding prompt_step<N> (not run.lock)
    return name in RUN_FILES or re.fullmatch(r'prompt_step\d+\.(npy|json)', name) is not None


class RunFolderInUse(OSError):
    """Another process holds the folder's run.lock."""


@contextlib.contextmanager
def own_folder(out: Path):
    """Hold out/run.lock (a flock: the kernel drops it when the process ends, kill -9 included) while a run
    writes to out. It says 'pid N on HOST since ...'; a run.lock that does not was not a run's: refused."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / 'run.lock'
    while True:
        f = open(lock, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise _in_use(out) from None
        # a run that ended between our open and flock removed the file we locked: lock the one there now
        if lock.exists() and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    with f:
        f.seek(0)
        held = f.read()
        if held and not re.fullmatch(r'pid \d+ on .* since .*\n', held):
            raise FileExistsError(f'{out}/run.lock was not written by a run (a run writes "pid N on HOST '
                                  f'since ..." there): move that file away, or pick another --out')
        f.truncate(0)
        f.write(f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)       # while still locked: no other run holds this file
            fcntl.flock(f, fcntl.LOCK_UN)


def _in_use(out: Path) -> RunFolderInUse:
    return RunFolderInUse(f'{out} is in use by another run ({folder_holder(out)}): wait for it to end, or '
                          f'pick another --out')


def folder_holder(out: Path) -> str | None:
    """Who holds out/run.lock now ('pid N on HOST since ...'), or None (a dead holder's lock died with it)."""
    with contextlib.suppress(FileNotFoundError), open(Path(out) / 'run.lock') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or 'holder unknown'
    return None


def check_out_folder(out: Path, resume: bool):
    """The CLI's check of --out before any weight is read (train_prompt checks again, under the lock)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f'--out {out} is a file: pick a folder for the run')
    if folder_holder(out):
        raise _in_use(out)
    if out.is_dir() and not resume:
        check_new_run(out, resume, lambda *_: None)


def finished(out: Path) -> bool:
    """Nothing left to train: the checkpoint reached its steps with no evaluation pending."""
    try:
        with np.load(Path(out) / 'checkpoint.npz') as z:
            state = json.loads(str(z['state']))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False
    return state['step'] >= state['config']['steps'] and not state.get('eval_pending') and \
        (Path(out) / 'prompt.npy').exists()


def check_new_run(out: Path, resume: bool, log):
    """A run at step 0 never replaces a run's files (nor, without resume, a checkpoint); with resume, a lone
    metrics.jsonl (stopped before its first checkpoint) is dropped. Leftover <run file>.tmp are removed."""
    for tmp in out.glob('*.tmp'):
        if run_file(tmp.name.removesuffix('.tmp')):
            tmp.unlink()
    earlier = sorted(f.name for f in out.iterdir() if run_file(f.name))
    if earlier == ['metrics.jsonl'] and resume:
        lines = len((out / 'metrics.jsonl').read_bytes().splitlines())
        (out / 'metrics.jsonl').unlink()
        log(f'{out} holds no checkpoint.npz, only the history of a run that stopped before its first '
            f'checkpoint: dropped its metrics.jsonl ({lines} line{"s" * (lines != 1)})')
    elif earlier and not (resume and 'checkpoint.npz' in earlier):
        problem = ('a run (checkpoint.npz): continue it with --resume (resume=True), or pick a new --out'
                   if 'checkpoint.npz' in earlier else
                   'metrics.jsonl of a run that stopped before its first checkpoint: start it again from '
                   'step 0 with --resume, or pick a new --out' if earlier == ['metrics.jsonl'] else
                   f'{", ".join(earlier)}, files a run writes, but no checkpoint.npz to resume from; a new '
                   f'run would overwrite them: pick a new --out (or move them away)')
        raise FileExistsError(f'{out} holds {problem}')


def run_identity(cfg, frozen, meta) -> dict:
    """What a run is (a resume must match it): the model's architecture, a fingerprint of its weights (leaves
    that differ between T5 1.1 and its LM-adapted version), the caller's meta (model, task, data)."""
    arch = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ('name', 'dropout_rate', 'remat', 'scan_layers')}
    h = hashlib.sha256()
    for stack, norm in (('encoder', 'encoder_norm'), ('decoder', 'decoder_norm')):
        for x in (frozen[stack][norm]['scale'], frozen[stack]['relpos_bias']['rel_embedding']):
            h.update(np.asarray(x, np.float32).tobytes())
    return json.loads(_json({'model': {**arch, 'weights': h.hexdigest()[:16]}, 'meta': meta or {}}))


class RunFolder:
    """A run's folder as train_prompt reads and writes it, the multi-host seam: process 0 alone writes, and
    what it decides (a refusal, the checkpoint a resume starts from) reaches every process (on_lead)."""

    def __init__(self, out):
        self.out, self.ckpt, self.lead = Path(out), Path(out) / 'checkpoint.npz', jax.process_index() == 0

    def take(self, held: contextlib.ExitStack, resume: bool, log):     # own_folder while `held` lasts
        def take():
            held.enter_context(own_folder(self.out))
            check_new_run(self.out, resume, log)
        on_lead(take)

    def start(self, prompt, tc: TrainConfig, run: dict, info: dict, resume: bool, log):
        """(prompt, opt_state, state): a fresh optimizer at step 0, or with resume the checkpoint."""
        optimizer = make_optimizer(tc.optimizer)
        prompt = jnp.array(prompt, jnp.float32)    # a copy: train_step donates (consumes) its prompt buffer

        def read():                                 # numpy: process 0 sends it to the others
            saved, opt_state, state = resume_checkpoint(self.ckpt, optimizer, tc, run, prompt.shape, info,
                                                        log)
            return np.asarray(saved), jax.tree.map(np.asarray, opt_state), state
        if resume and on_lead(self.ckpt.exists):
            saved, opt_state, state = on_lead(read)
            return jnp.asarray(saved), jax.tree.map(jnp.asarray, opt_state), state
        if resume:
            log(f'no checkpoint {self.ckpt} to resume: starting at step 0')
        state = {'step': 0, 'data_position': 0, 'seed': tc.seed, 'best_score': None, 'best_step': None,
                 'config': dataclasses.asdict(tc), 'run': run}
        return prompt, optimizer.init(prompt), state

    def history(self, event: dict):         # metrics.jsonl: progress (step, loss) or an evaluation (eval)
        if self.lead:
            with open(self.out / 'metrics.jsonl', 'ab') as f:
                f.write(_json(event, None) + b'\n')

    def save_prompt(self, name: str, prompt, info: dict):   # .npy: the format of Google's released prompts
        if self.lead:
            _atomic(self.out / f'{name}.npy', lambda f: np.save(f, np.asarray(prompt, np.float32)))
            _atomic(self.out / f'{name}.json', lambda f: f.write(_json(info)))

    def checkpoint(self, prompt, opt_state, state: dict):
        if self.lead:
            save_checkpoint(self.ckpt, prompt, opt_state, state)


def check_finite(loss: float, prompt, done: int, ckpt: Path, state: dict):
    """FloatingPointError on a non-finite loss or prompt (prompt None: not checked, it costs a transfer)."""
    if math.isfinite(loss) and (prompt is None or bool(jnp.isfinite(prompt).all())):
        return
    problem = f'loss is {loss} at step {done}' if not math.isfinite(loss) else \
        f'the prompt has NaN or inf values after step {done} (loss {loss})'
    last = f'The last good checkpoint {ckpt} (step {state["step"]}) is intact' if ckpt.exists() else \
        'No checkpoint was written yet'
    raise FloatingPointError(f'{problem}: stopping. {last}; lower --learning_rate or check the data and '
                             f'model, then rerun (with --resume)')


def resume_checkpoint(ckpt: Path, optimizer, tc: TrainConfig, run: dict, shape, info: dict, log):
    """(prompt, opt_state, state) of ckpt, refused if written with other settings than `free` (which change
    nothing a resumed run computes). Later events leave the history; prompt.json gets the current config."""
    prompt, opt_state, state = load_checkpoint(ckpt, optimizer)
    free = ('steps', 'log_every', 'eval_batch_size', 'sub_batches', 'remat', 'micro_batches')

    def parts(config, run):
        train = {k: v for k, v in config.items() if k != 'optimizer'}
        return {'train': train, 'optimizer': config['optimizer'], **run}
    saved, now = parts(state['config'], state['run']), parts(dataclasses.asdict(tc), run)
    changed = {f'{part}.{k}': (v, now[part][k]) for part in saved for k, v in saved[part].items()
               if k not in free and k in now.get(part, ()) and now[part][k] != v}
    if prompt.shape != shape:
        changed['prompt shape'] = (tuple(prompt.shape), tuple(shape))
    if changed:
        raise ValueError(f'{ckpt} was written with other settings {changed} (saved, now); only {free} may '
                         f'change on resume: rerun the same command, or pick a new --out')
    if tc.steps < state['step']:            # it would run nothing and record a shorter run than it holds
        raise ValueError(f"{ckpt} is at step {state['step']}, past steps={tc.steps}: resume with --steps >= "
                         f"{state['step']} (its best prompt is {ckpt.parent}/prompt.npy)")
    state.update(config=dataclasses.asdict(tc), run=run)
    cut_history(ckpt.parent, state['step'], bool(state.get('eval_pending')), log)
    best = ckpt.parent / 'prompt.json'
    if best.exists():
        _atomic(best, lambda f: f.write(_json({**json.loads(best.read_text()), 'config': info['config']})))
    log(f"resuming {ckpt} at step {state['step']} (best score {state['best_score']})")
    return prompt, opt_state, state


def cut_history(out: Path, step: int, eval_pending: bool, log):
    """On resume: drop the events after the checkpoint's step (redone), and its evaluation if pending. A torn
    last line (a crash) is dropped, and said; a damaged line before it is refused."""
    path, events = out / 'metrics.jsonl', []
    if not path.exists():
        return
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            event = json.loads(line)
            why = None if isinstance(event, dict) and type(event.get('step')) is int else 'no integer "step"'
        except ValueError as e:
            why = e
        if why and i < len(lines) - 1:
            raise ValueError(f'{path} line {i + 1} is not an event of a run ({why}): repair or delete that '
                             f'line, then rerun with --resume')
        if why:
            log(f'{path}: dropped its last line, cut short by a write that did not finish '
                f'({len(line)} bytes)')
        elif event['step'] < step or event['step'] == step and not ('eval' in event and eval_pending):
            events.append(line + b'\n')
    _atomic(path, lambda f: f.writelines(events))


class Interrupted(KeyboardInterrupt):
    """train_prompt stopped on SIGINT/SIGTERM after writing its checkpoint; exit_code = 128 + signal."""

    def __init__(self, signum: int, done: int, ckpt: Path):
        super().__init__(f'stopped by {signal.Signals(signum).name} after step {done}: {ckpt} holds it; '
                         f'rerun the same command with --resume (resume=True) to continue')
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_requests(log):
    """SIGINT/SIGTERM stop training after the step, with its checkpoint: the yielded function returns the
    signal (0: none) asked on any process. A second Ctrl-C exits at once (os._exit(130)). Not a raise: JAX's
    garbage-collection callback could swallow it, or an exit during a compile crash."""
    got = []

    def requested() -> int:
        mine = got[0] if got else 0
        return mine if jax.process_count() == 1 else \
            int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    if threading.current_thread() is not threading.main_thread():     # signal handlers: main thread only
        yield requested
        return

    def handler(signum, frame):
        got.append(signum)
        log(f'{signal.Signals(signum).name}: stopping after this step and writing the checkpoint '
            f'(Ctrl-C again to stop at once)')
    # `handler` runs between Python instructions (two signals in one compile reach it as one); the wakeup
    # socket gets each signal at once: a thread counts the SIGINTs there and ends the process on the second.
    wakeup, wakeup_w = socket.socketpair()
    wakeup_w.setblocking(False)

    def second_sigint():
        count = 0
        for byte in iter(lambda: wakeup.recv(1), b''):        # b'': the socket closed, training ended
            count += byte[0] == signal.SIGINT
            if count == 2:
                print('SIGINT again: stopped at once, without a checkpoint of the steps since the last one; '
                      'rerun the same command with --resume', file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(wakeup_w.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=second_sigint, daemon=True)
    watcher.start()
    try:
        yield requested
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        wakeup_w.close()
        watcher.join()
        wakeup.close()


def on_lead(fn, *args):
    """fn(*args) on process 0 alone (it owns the run folder); what it returns or raises reaches every
    process, so all take the same decision."""
    if jax.process_count() == 1:
        return fn(*args)
    payload = b''
    if jax.process_index() == 0:
        try:
            payload = pickle.dumps((fn(*args), None))
        except Exception as e:             # noqa: BLE001 -- re-raised on every process below
            payload = pickle.dumps((None, e))
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buf = np.zeros(n, np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    value, error = pickle.loads(multihost_utils.broadcast_one_to_all(buf).tobytes())
    if error is not None:
        raise error
    return value


# ------------------------------------------------------------------------------- I/O: sharding and multi-host
# Megatron-style split of the frozen weights over the 'model' axis: attention heads N, MLP width F, vocabulary
# V (else D). Candidate axes in order of preference; a leaf none of whose candidates divides stays replicated.
_MODEL_AXES = {'query': (1,), 'key': (1,), 'value': (1,), 'out': (0,), 'wi': (1,), 'wi_0': (1,), 'wi_1': (1,),
               'wo': (0,), 'token_embedder': (0, 1), 'logits_dense': (1, 0)}


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, timeout_s: int = 300):
    """Join a multi-host run: a coordinator (HOST:PORT of process 0) and the numbers given, or a launcher JAX
    sees (Slurm, Open MPI, a TPU pod). A wait says so after 2 s and exits in one line after timeout_s."""
    env = os.environ
    slurm, mpi = env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS'), env.get('OMPI_COMM_WORLD_SIZE')
    launched = (int(slurm or 1) > 1 and 'SLURM_STEP_ID' in env or int(mpi or 1) > 1
                or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
    if coordinator is None and not launched:
        return
    n = num_processes or slurm or mpi or 'all'
    who = f'process {process_id}' if process_id is not None else 'this process'
    where = f'coordinator {coordinator}' if coordinator else 'the coordinator JAX finds from the launcher'

    def give_up():
        print(f'error: {who}: the {n} processes did not all reach {where} within {timeout_s} s: start every '
              f'process with the same --coordinator and --num-processes, or raise --distributed-timeout',
              file=sys.stderr, flush=True)
        os._exit(1)
    waiting = f'{who}: waiting for {n} processes at {where} (up to {timeout_s} s, --distributed-timeout)'
    watchdogs = [threading.Timer(min(2, timeout_s / 2), lambda: print(waiting, flush=True)),
                 threading.Timer(timeout_s, give_up)]
    for w in watchdogs:
        w.daemon = True
        w.start()
    try:                                  # jax.distributed.initialize waits without holding Python's GIL
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=timeout_s + 10,
                                   heartbeat_timeout_seconds=min(100, timeout_s),
                                   shutdown_timeout_seconds=timeout_s)
    finally:
        for w in watchdogs:
            w.cancel()


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh: batch over 'data', frozen weights over 'model', whose groups stay within a
    host (fast links); only 'data' crosses hosts (a step's one collective there: the prompt gradient's)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    per_host = {}
    for d in devices.flat:
        per_host.setdefault(d.process_index, []).append(d)
    local = min(len(v) for v in per_host.values())
    if model_parallel < 1 or local % model_parallel or devices.size % model_parallel:
        raise ValueError(f'--model-parallel {model_parallel} does not divide the {local} devices of one host '
                         f'(groups stay within a host): pick a divisor of {local}')
    if len(per_host) == 1:
        return Mesh(devices.reshape(-1, model_parallel), ('data', 'model'))
    grid = mesh_utils.create_hybrid_device_mesh((local // model_parallel, model_parallel), (len(per_host), 1),
                                                devices=list(devices.flat), process_is_granule=True)
    return Mesh(grid, ('data', 'model'))


def param_shardings(mesh: Mesh, params):
    """A NamedSharding for every frozen leaf (arrays or ShapeDtypeStructs)."""
    n = mesh.shape['model']

    def spec(path, x):
        names = [getattr(k, 'key', None) for k in path]
        stacked = 'layers' in names             # [L, ...]: the layer axis is never split
        for axis in next((_MODEL_AXES[m] for m in reversed(names) if m in _MODEL_AXES), ()):
            axis += stacked
            if x.shape[axis] % n == 0:
                return NamedSharding(mesh, PartitionSpec(*[('model' if a == axis else None)
                                                           for a in range(x.ndim)]))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(mesh: Mesh | None, params):
    """Frozen weights onto the 'model' axis (_MODEL_AXES); mesh None or already placed there: unchanged."""
    if mesh is None:
        return params
    want = param_shardings(mesh, params)
    if all(getattr(x, 'sharding', None) == s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
        return params                          # loaded or created sharded (load_model): nothing to move
    return jax.device_put(params, want)


def shard_batch(mesh: Mesh | None, batch, runs_axis: bool = False):
    """A batch split over 'data' along axis 0 (runs_axis: axis 1 of [R,B,...]), from each process's own rows
    (process_rows); mesh None: unchanged."""
    if mesh is None:
        return batch
    b = next(iter(batch.values())).shape[int(runs_axis)] * jax.process_count()
    if b % mesh.shape['data']:
        raise ValueError(f"batch size {b} is not divisible by the {mesh.shape['data']} data-parallel "
                         f"devices: pick a --batch_size that is, or a larger --model-parallel")
    sharding = NamedSharding(mesh, PartitionSpec(*[None] * runs_axis, 'data'))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def process_rows(mesh: Mesh | None, batch_size: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold (and it reads)."""
    if mesh is None:
        return slice(0, batch_size)
    indices = NamedSharding(mesh, PartitionSpec('data')).addressable_devices_indices_map((batch_size,))
    return slice(min(i[0].start or 0 for i in indices.values()),
                 max(i[0].stop or batch_size for i in indices.values()))


def replicate(mesh: Mesh | None, tree):
    """A full copy on every device (the prompt and its optimizer state); mesh None: unchanged."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: np.asarray(x)[i]),
                        tree)


def spread_rows(mesh: Mesh | None, x):
    """An array every process holds whole (evaluation inputs), split over 'data' by rows."""
    if mesh is None:
        return x
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec('data')), lambda i: x[i])


def gather(x) -> np.ndarray:
    """A (possibly multi-host) array as one numpy array on every process (evaluation outputs)."""
    if getattr(x, 'is_fully_addressable', True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# -------------------------------------------------------------------------------------------------------- CLI
# What override refuses, field -> (ok, what it must be): a value that would fail (or divide by zero) only
# after hours of training. The configs are checked here, where a user sets them, and trusted elsewhere.
def _at_least(n):
    return lambda x: x >= n, f'>= {n}'


LIMITS = {**dict.fromkeys(('steps', 'batch_size', 'eval_every', 'checkpoint_every', 'log_every',
                           'eval_batch_size', 'length', 'vocab_pool'), _at_least(1)),
          **dict.fromkeys(('embedding_step', 'eval_limit', 'sub_batches', 'micro_batches'), _at_least(0)),
          'remat': (lambda x: x in REMATS, f'one of {REMATS}'),
          'init': (lambda x: x in INITS, f'one of {INITS}'),
          'eval_method': (lambda x: x in ('decode', 'rank'), "'decode' or 'rank'"),
          'dropout': (lambda x: 0 <= x < 1, 'in [0, 1)'),
          'z_loss': (lambda x: 0 <= x < math.inf, 'finite and >= 0'),
          'max_input_len': (lambda x: x >= 2, '>= 2: one token and EOS'),
          'max_target_len': (lambda x: x == 0 or x >= 2, "0 (the task's) or >= 2: one token and EOS"),
          'learning_rate': (lambda x: 0 < x < math.inf, 'finite and > 0'),
          'decay_rate': (lambda x: 0 < x <= 1, 'in (0, 1]'),
          'weight_decay': (lambda x: 0 <= x < 1, 'in [0, 1)'),
          'clipping_threshold': (lambda x: x > 0, '> 0')}


def override(cfg, argv):
    """Apply each `--field=value` of argv naming a field of cfg, checked (LIMITS); return (new cfg, the rest):
    override(TrainConfig(), ['--steps=30000', '--x=1']) -> (TrainConfig(steps=30000, ...), ['--x=1'])."""
    changes, rest, fields = {}, [], set()
    for f in dataclasses.fields(cfg):          # a nested config (TrainConfig.optimizer) takes its own
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            changes[f.name], argv = override(getattr(cfg, f.name), argv)
        else:
            fields.add(f.name)
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        name = name.replace('-', '_')
        if not (arg.startswith('--') and eq and name in fields):
            rest.append(arg)
            continue
        want = type(getattr(cfg, name))
        try:                                   # a str field keeps its text as is: --text=1984; float: nan too
            value = text if want is str else float(text) if want is float else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if type(value) is not want:
            raise ValueError(f'--{name}={text}: {type(cfg).__name__}.{name} expects {want.__name__}, '
                             f'got {type(value).__name__}')
        changes[name] = value
    cfg = dataclasses.replace(cfg, **changes)
    bad = [f'{f}={getattr(cfg, f)!r} (must be {why})' for f, (ok, why) in LIMITS.items()
           if f in fields and not ok(getattr(cfg, f))]
    if 'micro_batches' in fields and cfg.micro_batches and cfg.batch_size % cfg.micro_batches:
        bad.append(f'micro_batches={cfg.micro_batches} (must divide batch_size={cfg.batch_size})')
    if bad:
        raise ValueError(f"bad {type(cfg).__name__}: {', '.join(bad)}")
    return cfg, rest


def field_notes(cls) -> dict:
    """{field: its source comment} of a config dataclass: the comment lines above the field and the one after
    it, as written in this file (the help of --field)."""
    notes, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith('def '):
            break
        if text.startswith('#'):
            above.append(text.lstrip('# '))
            continue
        m = re.match(r'(\w+): [^=]+=.*?(?:#\s*(.*))?$', text)
        if m:
            notes[m[1]] = ' '.join(above + [m[2] or ''])
        above = []
    return notes


def add_config_flags(parser):
    """--field VALUE (--field=VALUE, --batch-size) for each config field the parser lacks a flag for."""
    group = parser.add_argument_group(
        'settings: every field of TrainConfig, OptimizerConfig and PromptConfig (spot.py), with its default '
        'and source', '--field VALUE or --field=VALUE; dashes for underscores work too (--batch-size 8)')
    for cls in (TrainConfig, OptimizerConfig, PromptConfig):
        notes = field_notes(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default):      # TrainConfig.optimizer: its fields are listed
                continue
            flags = [x for x in dict.fromkeys((f'--{f.name}', f'--{f.name.replace("_", "-")}'))
                     if x not in parser._option_string_actions]
            if flags:
                note = notes.get(f.name, '').replace('%', '%%')
                group.add_argument(*flags, dest=f'config.{f.name}', default=argparse.SUPPRESS,
                                   metavar=type(f.default).__name__.upper(),
                                   help=f'{cls.__name__}: {note} (default {f.default!r})')


def config_flags(args) -> list[str]:
    """The config fields add_config_flags parsed, as override's argv: ['--batch_size=8', ...]."""
    return [f'--{dest.removeprefix("config.")}={value}' for dest, value in vars(args).items()
            if dest.startswith('config.')]


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """JAX's compile cache at path, $SPOT_COMPILE_CACHE or $XDG_CACHE_HOME/spot-jax; 'off' (or 0): none."""
    path = path or os.environ.get('SPOT_COMPILE_CACHE') or \
        Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'spot-jax'
    if str(path).lower() in ('off', '0', 'false', 'no', 'none'):
        return None
    path = Path(path).expanduser()
    jax.config.update('jax_compilation_cache_dir', str(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)   # the steps, not every tiny op
    return path


# --dtype of the frozen weights. The official runs compute in bfloat16 from float32 parameters (prompt-tuning
# configs/architectures/t5_1_1_flaxformer.gin: ACTIVATION_DTYPE = 'bfloat16'); weights cast once give the same
# products at half the memory. Norms, softmax, logits, loss, prompt and optimizer stay float32 (t5_model).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def load_model(name: str, seed: int = 0, dtype: str = 'float32', mesh: Mesh | None = None):
    """--model ('tiny': random, a hub id, a directory) -> (cfg, params in dtype), made or read into mesh."""
    dtype, place = DTYPES[dtype], mesh and functools.partial(param_shardings, mesh)
    if name != 'tiny':
        return t5_model.load_checkpoint(name, dtype, place)
    cfg = t5_model.T5Config.tiny()
    params = t5_model.init_params(jax.random.key(seed), cfg, dtype)
    # placed after the draw: a draw partitioned over the mesh needs collectives, which on CPU host devices
    # sharing 2 cores can miss XLA's 40 s rendezvous
    return cfg, jax.device_put(params, place(params)) if place else params


def check_vocab(vocab, cfg: t5_model.T5Config, model: str):
    """An id past the embedding is clamped to its last row: a larger vocabulary scores wrong, silently."""
    if vocab.vocab_size > cfg.vocab_size:
        raise ValueError(f'vocabulary {vocab.path} has {vocab.vocab_size} pieces but model {model} embeds '
                         f'only {cfg.vocab_size} ids: pass the vocabulary the model was trained with '
                         f'(--vocab)')


def device_summary() -> str:
    """What JAX runs on (a run meant for a GPU must not go on unnoticed on the CPU)."""
    devices = jax.devices()
    hint = ' (the CPU build of jax: README, "On a GPU or TPU")' if jax.default_backend() == 'cpu' else ''
    hosts = f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''
    return f'JAX {jax.__version__}: {len(devices)} {devices[0].device_kind} device(s){hosts}, ' \
           f'backend {jax.default_backend()}{hint}'


PROMPT_FILES = ('.npy [P,D]; a T5X prompt file (encoder.prompt.prompt.prompt) or its checkpoint_<step> '
                'folder; a PEFT prompt-tuning adapter folder')


def model_config(name: str) -> t5_model.T5Config:
    """--model's T5Config alone: 'tiny', a directory's or the hub's config.json, a known name."""
    if name == 'tiny':
        return t5_model.T5Config.tiny()
    d = Path(name).expanduser()
    if d.is_dir():
        try:
            return t5_model.T5Config.from_hf(json.loads((d / 'config.json').read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f'{d / "config.json"} is not a readable T5 config ({e})') from None
    if name in t5_model.KNOWN_NAMES:
        return t5_model.T5Config.from_name(name)
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(name, 'config.json')
    except (OSError, ValueError) as e:              # offline, no such repo, a malformed id: one line
        raise FileNotFoundError(f'--model {name} is neither a directory nor a hub model ({e})') from None
    return t5_model.T5Config.from_hf(json.loads(Path(path).read_text()))


# Bad input (a wrong path, a missing package or file, offline, a task without a metric, a NaN loss): spot.py
# and the experiment scripts print one line, no traceback (--debug or SPOT_DEBUG=1 shows it).
USER_ERRORS = (FloatingPointError, ValueError, KeyError, OSError, ImportError, NotImplementedError,
               MemoryError)


def main(argv=None):
    p = argparse.ArgumentParser(prog='spot.py', allow_abbrev=False, description=__doc__.split('\n')[0],
                                epilog='Every config field is a flag of train, eval and plan: '
                                       'spot.py train --help lists them.')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error (also SPOT_DEBUG=1)')
    sub = p.add_subparsers(dest='cmd', required=True)
    train, ev = sub.add_parser('train', allow_abbrev=False), sub.add_parser('eval', allow_abbrev=False)
    plan = sub.add_parser('plan', allow_abbrev=False,
                          help="train's memory plan per device, from shapes alone (no weight or data read)")
    for q in (train, ev, plan):
        q.add_argument('--model', required=True, help="hub id (google/t5-base-lm-adapt), folder or 'tiny'")
        q.add_argument('--task', required=q is not plan, nargs=None if q is ev else '+',
                       help='a task name of data.py')
        q.add_argument('--data', help='directory with the original task files (default: tfds)')
        q.add_argument('--vocab', help='SentencePiece model (default: data.load_vocab())')
        q.add_argument('--model-parallel', type=int, default=1, help="devices per 'model' mesh group")
        q.add_argument('--dtype', default='float32', choices=DTYPES,
                       help='frozen weights and activations; bfloat16 as the official runs (prompt: float32)')
        q.add_argument('--coordinator', help='multi-host: HOST:PORT of process 0 (README, Multi-host)')
        q.add_argument('--num-processes', type=int, help='multi-host: number of processes')
        q.add_argument('--process-id', type=int, help='multi-host: this process, 0 .. N-1')
        q.add_argument('--distributed-timeout', type=int, default=300, help='multi-host: wait for peers (s)')
        q.add_argument('--no-compile-cache', action='store_true', help='keep no compiled steps on disk')
    for q in (train, plan):
        q.add_argument('--device-memory', type=float, metavar='GIB',
                       help="memory per device to plan for (default: the device's own; on CPU the RAM)")
    train.add_argument('--init', choices=INITS, help='prompt initialisation (default sampled_vocab)')
    train.add_argument('--source-prompt', nargs='+', help='SPoT transfer: start from ' + PROMPT_FILES)
    train.add_argument('--seeds', help='several runs, e.g. 0,1,2: run k in OUT/seed<k>')
    train.add_argument('--runs-per-step', type=int, default=0, help='runs that share a step (default: all)')
    train.add_argument('--out', required=True, help='run directory')
    train.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.npz')
    ev.add_argument('--prompt', required=True, help=PROMPT_FILES + '; a run folder (its prompt.npy)')
    ev.add_argument('--split', default='validation')
    ev.add_argument('--out', metavar='FILE.json', help='also write the scores there')
    for q in (train, ev, plan):
        add_config_flags(q)
    export = sub.add_parser('export', allow_abbrev=False, help='write a prompt as a PEFT adapter folder')
    export.add_argument('--prompt', required=True, help=PROMPT_FILES)
    export.add_argument('--model', required=True, help='the T5 it was tuned on: hub id or directory')
    export.add_argument('--out', required=True, help='adapter folder to write')
    args = p.parse_args(argv)
    try:
        tc, rest = override(TrainConfig(), config_flags(args))
        pc, rest = override(PromptConfig(), rest)
    except ValueError as e:                       # a mistyped or out-of-range --field=value
        p.error(str(e))

    enable_compile_cache('off' if getattr(args, 'no_compile_cache', False) else None)
    try:
        commands = {'eval': evaluate_cli, 'train': train_cli, 'export': export_cli, 'plan': plan_cli}
        commands[args.cmd](args, tc, pc)
    except USER_ERRORS as e:
        if args.debug or os.environ.get('SPOT_DEBUG', '') not in ('', '0'):
            raise
        sys.exit(f'error: {e}')
    except Interrupted as e:                      # Ctrl-C / SIGTERM in training: its checkpoint is written
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:                     # before training started: nothing to keep
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def say(*args, **kw):
    """print, on process 0 alone."""
    if jax.process_index() == 0:
        print(*args, **{'flush': True, **kw})


def _devices(args):
    """Join the other processes (multi-host) and make the mesh; None on one device."""
    init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    say(device_summary())
    return make_mesh(args.model_parallel) if jax.device_count() > 1 or args.model_parallel != 1 else None


def _check_data_dir(args):
    if args.data and not Path(args.data).expanduser().is_dir():
        raise FileNotFoundError(f'--data {args.data} is not a folder: pass the folder of the task files '
                                f'(`python3 data.py fetch glue superglue` caches the GLUE/SuperGLUE ones)')


def _vocab(args):
    vocab = data.model_vocab(args.model, args.vocab)
    check_vocab(vocab, _model_shapes(args)[0], args.model)
    return vocab


def _load_weights(args, tc, mesh):       # load_model, said: a large checkpoint takes minutes
    start = time.perf_counter()
    say(f"loading the weights of {'a random tiny T5' if args.model == 'tiny' else args.model} ({args.dtype})")
    cfg, frozen = load_model(args.model, tc.seed, args.dtype, mesh)
    n = sum(x.size for x in jax.tree.leaves(frozen))
    say(f'loaded {n / 1e6:,.1f}M weights in {time.perf_counter() - start:.1f} s')
    return cfg, frozen


def progress_printer(what: str, log=print, every: float = 30.0):
    """evaluate's progress(done, total): 'what: done/total examples (N s)' first, every `every` s, last."""
    start, last = time.perf_counter(), [-math.inf]

    def report(done, total):
        now = time.perf_counter()
        if now - last[0] >= every or done == total:
            last[0] = now
            log(f'{what}: {done}/{total} examples ({now - start:.0f} s)', flush=True)
    return report


def evaluate_cli(args, tc, pc):
    prompt = load_prompt(args.prompt)               # cheap checks first: the prompt, task, data, output
    mixture, tasks = data.task_names(args.task)
    if mixture:
        raise ValueError(f'--task {args.task} is a mixture (no one metric): pass one of {", ".join(tasks)}')
    task = data.get_task(args.task).name
    _check_data_dir(args)
    if args.out and Path(args.out).is_dir():
        raise IsADirectoryError(f'--out {args.out} is a folder: pass a file name (scores.json)')
    mesh, vocab = _devices(args), _vocab(args)
    n = len(data.load_examples(task, args.split, args.data)[:tc.eval_limit or None])   # before the weights
    cfg, frozen = _load_weights(args, tc, mesh)
    check_prompt(prompt, cfg.d_model, what=f'prompt {args.prompt}')
    say(f'evaluating {args.prompt} on {task} {args.split}: {n} examples ({tc.eval_method})')
    evaluator = make_evaluator(task, frozen, cfg, vocab, tc, args.split, args.data, mesh,
                               progress=progress_printer(f'{task} {args.split}', say))
    record = {'task': task, 'split': args.split, 'examples': n, 'prompt': str(args.prompt),
              'model': args.model, **evaluator(jnp.asarray(prompt, jnp.float32))}
    say(json.dumps(record))
    if args.out and jax.process_index() == 0:
        _atomic(Path(args.out), lambda f: f.write(_json(record)))
        say(f'wrote {args.out}')


def export_cli(args, tc, pc):
    if args.model == 'tiny':
        raise ValueError('--model tiny is a random model that PEFT cannot load: pass a hub id or directory')
    cfg = model_config(args.model)
    prompt = load_prompt(args.prompt, cfg.d_model)
    out = export_peft(prompt, cfg, args.out, args.model)
    base = f'T5ForConditionalGeneration.from_pretrained({args.model!r})'
    print(f'wrote {out}/{PEFT_CONFIG} and {PEFT_WEIGHTS} ({prompt.shape[0]} virtual tokens); in PEFT: '
          f'PeftModel.from_pretrained({base}, {str(out)!r})')


def _model_shapes(args):                 # --model's T5Config and weight shapes, no weight read
    cfg = model_config(args.model)
    return cfg, jax.eval_shape(lambda k: t5_model.init_params(k, cfg, DTYPES[args.dtype]), jax.random.key(0))


def _plan_or_refuse(args, tc, pc, mesh, plan_anyway=False):
    """The memory plan from shapes; train refuses, in one line, a run that does not fit."""
    cfg, shapes = _model_shapes(args)
    target_len = tc.max_target_len or max((data.get_task(t).target_len for name in args.task or []
                                           for t in data.task_names(name)[1]), default=DEFAULT_TARGET_LEN)
    sizes = dict(input_len=tc.max_input_len, target_len=target_len, prompt_len=pc.length)
    if plan_anyway:
        return memory_plan(cfg, tc, shapes, **sizes, mesh=mesh, device_memory_gib=args.device_memory, log=say)
    tc, plan = resolve_memory(cfg, tc, shapes, *sizes.values(), mesh, args.device_memory, say)
    if plan is None or plan['fits']:
        return tc
    if plan['weights'] + plan['prompt_optimizer'] > plan['budget']:
        why, n = f"{args.model}'s weights alone need", plan['weights']
        fix = ('--dtype bfloat16, ' if args.dtype == 'float32' else '') + \
            '--model-parallel N over more devices, or a device with more memory'
    elif plan['eval_peak'] > plan['budget'] >= plan['step_peak']:
        why, n, fix = 'the evaluation needs', plan['eval_peak'], f'--eval_batch_size < {tc.eval_batch_size}'
    else:
        why, n = f"the run (remat {plan['remat']}, micro_batches {plan['micro_batches']}) needs", plan['peak']
        fix = ('' if tc.remat == 'auto' and not tc.micro_batches else '--remat=auto --micro_batches=0, ') + \
            'a smaller --batch_size or --max_input_len, --model-parallel N, or --dtype bfloat16'
    raise MemoryError(f"{why} {n / GiB:.1f} GiB per device, more than the {plan['budget'] / GiB:.1f} GiB "
                      f"planned for ({plan['budget_source']}): use {fix}")


def plan_cli(args, tc, pc):
    plan = _plan_or_refuse(args, tc, pc, _devices(args), plan_anyway=True)
    rows = [('weights', plan['weights']), ('prompt + optimizer', plan['prompt_optimizer']),
            ('activations/temporaries', plan['temporaries']), ('training step total', plan['step_peak']),
            (f"evaluation total (batch {plan['eval_batch_size']})", plan['eval_peak'])]
    for what, n in rows:
        print(f'{what + ":":33} ' + ('not compiled: the weights alone do not fit' if n is None else
                                      f'{n / GiB:8.2f} GiB'))
    print(f"{'plans for:':33} {plan['budget'] / GiB:8.2f} GiB ({plan['budget_source']})")
    print(f"remat: {plan['remat']}, micro_batches: {plan['micro_batches']}"
          f"{'' if plan['fits'] else '  (does NOT fit: see above)'}")
    print(f"compile: {plan['compile_s']:.1f} s")
    print(f"peak per device: {plan['peak'] / GiB:.2f} GiB")


def train_cli(args, tc, pc):
    # cheap checks first (task, flags, files, output folders), then the data, and the weights last
    if tc.optimizer.learning_rate > 10:           # valid, but 33x the paper's 0.3 (footnote 7)
        print(f"warning: learning_rate={tc.optimizer.learning_rate:g} is far above prompt tuning's 0.3 (SPoT "
              f"footnote 7): steps that large usually make the loss NaN", file=sys.stderr)
    try:
        seeds = [int(k) for k in args.seeds.split(',')] if args.seeds else [tc.seed]
    except ValueError:
        raise ValueError(f'--seeds {args.seeds}: expected seeds separated by commas, e.g. 0,1,2') from None
    sources = args.source_prompt or [pc.source]
    # One run per (task, source prompt, seed): OUT, or OUT/<task>/<source's name>/seed<k> where several
    runs = [(task, source, seed, Path(args.out, *([task] if len(args.task) > 1 else []),
                                      *([Path(source).stem] if len(sources) > 1 else []),
                                      *([f'seed{seed}'] if args.seeds else [])))
            for task in args.task for source in sources for seed in seeds]
    if len({str(out) for *_, out in runs}) < len(runs):
        raise ValueError('two runs would share a folder: give each --task, --source-prompt and seed once')
    pcs = {source: dataclasses.replace(pc, init=args.init or ('file' if source else pc.init), source=source)
           for source in sources}
    tasks = {task: data.task_names(task) for task in args.task}            # --task -> (mixture, its tasks)
    for task, (mixture, names) in tasks.items():
        if any(p.init == 'class_labels' for p in pcs.values()) and (
                mixture or not data.get_task(names[0]).output_labels):
            raise ValueError(f'{task} has no class labels: use --init text --text="..." (Lester: task words)')
    for source, p in pcs.items():
        if p.init == 'file' and not source or p.init == 'text' and not p.text:
            need = '--source-prompt PATH' if p.init == 'file' else '--text=...'
            raise ValueError(f'--init {p.init} needs {need}')
        if p.init == 'file':
            load_prompt(source, length=p.length, what='source prompt')
    if args.runs_per_step < 0:
        raise ValueError(f'--runs-per-step {args.runs_per_step}: must be >= 1 (0: all runs)')
    _check_data_dir(args)
    mesh = _devices(args)
    for *_, out in runs:
        on_lead(check_out_folder, Path(out), args.resume)
    # R runs' batches of B rows in one step take the memory of one run's batch of R * B; micro-batches split
    # each run's batch. Without --runs-per-step, R halves until the plan fits.
    R = min(args.runs_per_step or len(runs), len(runs))
    while True:
        try:
            planned = _plan_or_refuse(args, dataclasses.replace(tc, batch_size=tc.batch_size * R), pc, mesh)
            break
        except MemoryError as e:
            if args.runs_per_step or R == 1:
                raise
            print(f'{R} runs per step do not fit ({e}): trying {R // 2}')
            R //= 2
    m, B = planned.micro_batches, tc.batch_size
    tc = dataclasses.replace(planned, batch_size=B, micro_batches=m and math.gcd(m, B))
    vocab = _vocab(args)
    # Read (per batch: data.train_source) before the weights: missing files, or tfds offline, fail in seconds.
    data_sources = {(t, seed): data.train_source(t, vocab, tc.max_input_len, tc.max_target_len, args.data,
                                                 seed)
                    for _, names in tasks.values() for t in names for seed in seeds}
    cfg, frozen = _load_weights(args, dataclasses.replace(tc, seed=0), mesh)   # 'tiny': one for every seed
    evaluators = {}                                   # one per task, shared by its runs

    def make_run(task_arg, source, seed, out) -> Run:  # its task (or mixture), prompt, batches and evaluator
        run_tc, run_pc, (mixture, names) = dataclasses.replace(tc, seed=seed), pcs[source], tasks[task_arg]
        task = data.get_task(names[0])
        labels = None if run_pc.init != 'class_labels' else [list(vocab.encode(x)) for x in
                                                              task.output_labels]
        text = list(vocab.encode(run_pc.text)) if run_pc.text else None
        prompt = gather(init_prompt(jax.random.split(jax.random.key(seed))[0], frozen, run_pc, labels, text))
        sources = {t: data_sources[t, seed] for t in names}
        # What the run reads (by content, not path), so that --resume with other data or vocabulary is refused
        reads = {'data': 'files' if args.data else 'tfds', 'vocab': vocab.fingerprint,
                 'files': {t: data.data_fingerprint(t, 'train', args.data) for t in names}}
        rows, n = process_rows(mesh, run_tc.batch_size), jax.process_count()   # this process's devices' rows
        share = dict(process_index=rows.start // (run_tc.batch_size // n), process_count=n)

        def batches(k):
            if mixture:
                return data.mixture_batches(sources, run_tc.batch_size, seed, start=k, **share)
            return data.batches(sources[task.name], run_tc.batch_size, seed, start=k, **share)
        if task.metrics and not mixture and task.name not in evaluators:
            evaluators[task.name] = make_evaluator(task.name, frozen, cfg, vocab, run_tc, data_dir=args.data,
                                                   mesh=mesh)
        evaluator = None if mixture else evaluators.get(task.name)
        if evaluator is None:       # c4 (prefix LM) and the mixtures (SPoT's sources): no validation metric
            say(f'{task_arg}: no validation metric; {out}/prompt.npy will be the prompt after the last step')
        return Run(prompt, run_tc, batches, evaluator, out,
                   meta={'model': args.model, 'dtype': args.dtype, 'task': task_arg, 'init': run_pc.init,
                         'prompt_config': dataclasses.asdict(run_pc), 'reads': reads})
    made = [make_run(*run) for run in runs]
    results = train_prompts(made, frozen, cfg, resume=args.resume, mesh=mesh, runs_per_step=R)
    for run, result in zip(made, results):
        best, step, out = result['best_score'], result['best_step'], run.out_dir
        if run.evaluator is None:
            say(f"prompt in {out}/prompt.npy (the prompt after step {result['step']})")
        elif best is None or not math.isfinite(best):     # NaN: Pearson of constant predictions
            say(f'no evaluation gave a finite score; prompt in {out}/prompt.npy is the first evaluated '
                f'(step {step})')
        else:
            say(f'best score {best} at step {step}; prompt in {out}/prompt.npy')


if __name__ == '__main__':
    main()
