"""spot.py: prompt-only gradients, frozen weights, initialisations, Adafactor parity, exact resume, NaN stop,
sharding.

Every training test shares one TrainConfig (TC) and one batch shape, so train_step compiles once for the
module.
"""
import argparse
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import retrieval
import spot
import t5_model
from conftest import ORACLE_INSTALL, f32_atol, network_roundings

ROOT = Path(__file__).resolve().parents[1]
CFG = t5_model.T5Config.tiny()
P, B, S, POISON = 8, 4, 10, 7
TC = spot.TrainConfig(steps=12, batch_size=B, eval_every=4, checkpoint_every=4, embedding_step=6,
                      log_every=4)
STEP = (TC.optimizer, TC.z_loss, spot.sub_batch_count(TC))   # train_step's static arguments after cfg
PC = spot.PromptConfig(length=P)


def quiet(line):
    pass


@pytest.fixture(scope='module')
def frozen():
    return t5_model.init_params(jax.random.key(0), CFG)


def synthetic_batches(seed=0, poison_from=None, crash_at=None):
    """A learnable toy task: random inputs, always the answer [42, 43, EOS]. Batch k is a pure function of
    (seed, k), as data.batches promises. poison_from: token POISON appears from batch k on; crash_at: batch k
    raises."""
    def batches(start):
        for k in itertools.count(start):
            if k == crash_at:
                raise RuntimeError('preempted')
            rng = np.random.default_rng([seed, k])
            inputs = rng.integers(10, 5000, (B, S)).astype(np.int32)
            inputs[:, 6], inputs[:, 7:] = t5_model.EOS_ID, t5_model.PAD_ID
            if poison_from is not None and k >= poison_from:
                inputs[0, 0] = POISON
            yield {'inputs': inputs, 'targets': np.tile(np.int32([42, 43, t5_model.EOS_ID]), (B, 1))}
    return batches


EVAL_BATCH = next(synthetic_batches(seed=99)(0))
_eval_loss = jax.jit(spot.prompt_loss, static_argnames='cfg')


def evaluator(frozen):
    return lambda prompt: {'score': -float(_eval_loss(prompt, frozen, EVAL_BATCH, CFG))}


def leaves_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


# --------------------------------------------------------------------------------------------------- the step
def test_gradient_is_the_prompt_only_and_frozen_is_an_argument(frozen):
    prompt, batch = jnp.ones((P, CFG.d_model)), EVAL_BATCH
    grad_jaxpr = jax.make_jaxpr(jax.grad(spot.prompt_loss), static_argnums=3)(
        prompt, frozen, batch, CFG, spot.dropout_key(0, 0))
    assert [tuple(a.shape) for a in grad_jaxpr.out_avals] == [(P, CFG.d_model)]
    opt_state = spot.make_optimizer(TC.optimizer).init(prompt)
    step_jaxpr = jax.make_jaxpr(spot.train_step, static_argnums=(5, 6, 7, 8))(
        prompt, opt_state, frozen, batch, spot.dropout_key(0, 0), CFG, *STEP)
    frozen_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(frozen)}
    out_shapes = [tuple(a.shape) for a in step_jaxpr.out_avals]
    assert out_shapes[0] == (P, CFG.d_model) and out_shapes[-1] == ()           # new prompt ... loss
    assert not frozen_shapes & set(out_shapes), \
        'a weight-shaped output: something other than the prompt trains'
    big_consts = [c for c in step_jaxpr.consts if np.size(c) > 1000]
    assert not big_consts, 'frozen weights were captured as constants of the step'


def test_sub_batches_change_nothing_but_the_schedule(frozen):
    """train_step's sub-batches (execution only) give the loss, gradient and dropout masks of the whole
    batch."""
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    batch = {k: jnp.asarray(v) for k, v in EVAL_BATCH.items()}
    batch['targets'] = batch['targets'].at[0, 1:].set(0)                      # unequal token counts per row
    cfg, key = dataclasses.replace(CFG, dropout_rate=0.1), spot.dropout_key(0, 5)
    ref = jax.value_and_grad(spot.prompt_loss)(prompt, frozen, batch, cfg, key)
    for k in (1, 2, B):
        sub_batched_loss = spot.sub_batched(spot.prompt_loss, k)
        loss, grad = jax.value_and_grad(sub_batched_loss)(prompt, frozen, batch, cfg, key, TC.z_loss)
        # The sub-batches sum the same terms in another order: float32 rounding of the network, the batch sum
        # on top.
        n = network_roundings(CFG, P + S) + B
        np.testing.assert_allclose(loss, ref[0], rtol=0, atol=f32_atol(ref[0], n))
        np.testing.assert_allclose(grad, ref[1], rtol=0, atol=f32_atol(ref[1], n))


@pytest.mark.parametrize('k', [2, 4])
def test_micro_batches_give_the_whole_batchs_loss_gradient_and_update(frozen, k):
    """micro_batched (sequential, lax.scan): the token-weighted loss and gradient of the whole batch, with the
    same dropout masks, to float32 rounding; and train_step's update with it."""
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    batch = {n: jnp.asarray(v) for n, v in EVAL_BATCH.items()}
    batch['targets'] = batch['targets'].at[0, 1:].set(0)                      # unequal token counts per row
    cfg, key = dataclasses.replace(CFG, dropout_rate=0.1), spot.dropout_key(0, 5)
    ref = jax.value_and_grad(spot.prompt_loss)(prompt, frozen, batch, cfg, key, TC.z_loss)
    micro_batched = spot.micro_batched(jax.value_and_grad(spot.prompt_loss), k)
    got = micro_batched(prompt, frozen, batch, cfg, key, TC.z_loss)
    n = network_roundings(CFG, P + S) + B      # the same terms summed in another order
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=f32_atol(ref[0], n))
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=f32_atol(ref[1], n))
    assert float(jnp.abs(ref[1]).max()) > 0
    whole, parts = (spot.train_step(jnp.array(prompt), spot.make_optimizer(TC.optimizer).init(prompt), frozen,
                                    batch, key, cfg, TC.optimizer, TC.z_loss, sub, micro)
                    for sub, micro in ((1, 1), (2, k)))
    # Adafactor divides by the gradient's root mean square: an update of size lr, rounding relative to it
    np.testing.assert_allclose(parts[0], whole[0], rtol=0, atol=f32_atol(TC.optimizer.learning_rate, n))


def test_prefetch_keeps_order_ends_and_raises_at_the_batch_that_failed():
    assert list(spot.prefetch(iter(range(7)))) == list(range(7))

    def failing():
        yield from range(3)
        raise RuntimeError('preempted')
    got = spot.prefetch(failing())
    assert [next(got) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match='preempted'):
        next(got)


@pytest.fixture(scope='module')
def twenty_steps(frozen):
    """20 steps from the same start, twice in this process: (frozen before, run 1, run 2), each run a dict of
    the training losses and the held-out (no dropout) loss before and after."""
    before, runs = leaves_bytes(frozen), []
    for _ in range(2):
        prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
        held_out = [-evaluator(frozen)(prompt)['score']]
        opt_state, data, losses = spot.make_optimizer(TC.optimizer).init(prompt), synthetic_batches()(0), []
        for step in range(20):
            prompt, opt_state, loss = spot.train_step(prompt, opt_state, frozen, next(data),
                                                      spot.dropout_key(0, step), CFG, *STEP)
            losses.append(float(loss))
        # The training objective (dropout on) of the first and the last prompt, on the same batches and masks
        train_cfg = dataclasses.replace(CFG, dropout_rate=TC.dropout)
        first = spot.init_prompt(jax.random.key(1), frozen, PC)
        paired = [[float(spot.prompt_loss(p, frozen, b, train_cfg, spot.dropout_key(0, k)))
                   for p in (first, prompt)]
                  for k, b in zip(range(20), synthetic_batches()(0))]
        held_out.append(-evaluator(frozen)(prompt)['score'])
        runs.append({'losses': losses, 'held_out': held_out, 'paired': paired})
    return before, *runs


def test_frozen_params_bit_identical_after_20_steps(frozen, twenty_steps):
    assert leaves_bytes(frozen) == twenty_steps[0]


def test_loss_falls_on_a_learnable_task(twenty_steps):
    run = twenty_steps[1]
    print('held-out loss (no dropout) before, after:', run['held_out'])
    assert run['held_out'][1] < run['held_out'][0] - 0.3, run['held_out']      # ~11.3 -> ~10.7 measured
    # With dropout on, step-to-step losses are too noisy to compare (T5's masks drop whole features of a
    # 16-wide model); on the same 20 batches and masks, the last prompt has the lower training loss.
    first, last = np.mean(run['paired'], axis=0)
    print(f'training loss on the same batches and masks: first prompt {first:.3f}, last {last:.3f}')
    assert last < first - 0.1, run['paired']


# The first 5 training losses of the tiny model (init_params(key(0)), init_prompt(key(1)),
# synthetic_batches(0), dropout_key(0, step)), recorded when the test was written (issue 29). A change to the
# recipe (loss, z-loss, dropout, initialisation, optimizer, data order) moves them by more than the tolerance.
GOLDEN_FIRST_LOSSES = (11.024600982666016, 10.903053283691406, 10.899706840515137, 10.375723838806152,
                       10.096474647521973)


def test_first_losses_are_the_golden_ones(twenty_steps):
    """Golden regression (llm.c style): the same first 5 losses in both runs of this process, and the recorded
    ones on any machine. Tolerance: another XLA build may sum in another order; float32 rounding of an n-term
    sum grows like sqrt(n) eps, n = 32,128 (the vocabulary's log-sum-exp, the longest reduction), 10x for the
    other sums on the path, and it compounds over the k steps before loss k."""
    losses = twenty_steps[1]['losses'][:5]
    assert losses == twenty_steps[2]['losses'][:5]
    per_step = 10 * np.sqrt(CFG.vocab_size) * np.finfo(np.float32).eps
    for k, (got, want) in enumerate(zip(losses, GOLDEN_FIRST_LOSSES)):
        assert got == pytest.approx(want, rel=(k + 1) * per_step), (k, losses)


def test_dropout_is_on_in_training_and_keyed(frozen):
    """Same (seed, step) -> same training loss; other keys -> other losses; evaluation (no key) differs from
    all."""
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    def train_loss(seed, step):
        p = jnp.array(prompt)                                   # copies: train_step consumes its inputs
        return float(spot.train_step(p, spot.make_optimizer(TC.optimizer).init(p), frozen, EVAL_BATCH,
                                     spot.dropout_key(seed, step), CFG, *STEP)[2])
    assert train_loss(0, 3) == train_loss(0, 3)
    losses = {train_loss(0, 3), train_loss(0, 4), train_loss(1, 3), -evaluator(frozen)(prompt)['score']}
    assert len(losses) == 4


@pytest.mark.parametrize('t5x_start, opt', [(0, spot.OptimizerConfig(decay_offset=0)),
                                           (spot.LM_ADAPT_CHECKPOINT_STEP, spot.OptimizerConfig())])
def test_optax_adafactor_matches_t5x_update(t5x_start, opt):
    """make_optimizer(opt) vs a numpy transcription of t5x/adafactor.py (unfactored [100,768],
    beta2_t = 1 - (t+1)^-0.8, update clipped to RMS 1, new = (1 - wd) * p - lr * y) over 20 steps. T5X counts
    t from the step of the checkpoint it restored (1.1M for the LM-adapted T5 1.1 of the official prompt
    runs): the default OptimizerConfig must match that run, and decay_offset=0 one that counts from 0."""
    def t5x_step(p, v, g, step, lr=0.3, decay=0.8, clip=1.0, wd=1e-5):
        # beta2 in float32 as both t5x and optax compute it: near t = 1.1M, 1 - beta2 = 1.4e-5 keeps only
        # ~0.4% of precision (float32 spacing below 1 is 6e-8), a rounding that differs from step to step.
        b2 = np.float64(np.float32(1.0) - np.float32(step + 1.0) ** np.float32(-decay))
        v = b2 * v + (1 - b2) * (g * g + 1e-30)
        y = g / np.sqrt(v)
        y /= max(1.0, np.sqrt(np.mean(y * y)) / clip)
        return (1.0 - wd) * p - lr * y, v

    rng = np.random.default_rng(0)
    p_ref = rng.normal(size=(100, 768)).astype(np.float32)
    v_ref, p = np.zeros_like(p_ref), jnp.asarray(p_ref)
    tx = spot.make_optimizer(opt)
    state, update = tx.init(p), jax.jit(tx.update)
    for step in range(20):
        g = rng.normal(scale=10.0 ** rng.uniform(-3, 1), size=p_ref.shape).astype(np.float32)
        upd, state = update(jnp.asarray(g), state, p)
        p = p + upd
        p_ref, v_ref = t5x_step(p_ref.astype(np.float64), v_ref, g.astype(np.float64),
                                t5x_start + step)
    # float32 against a float64 oracle: per step a few roundings of the update and one of p + update
    np.testing.assert_allclose(np.asarray(p), p_ref, rtol=0, atol=f32_atol(p_ref, 20 * 4))


class WordVocab:
    """A stand-in vocabulary: word i of WORDS is token 100 + i."""
    WORDS = ['entailment', 'not_entailment', 'maybe']

    def encode(self, text):
        return [100 + self.WORDS.index(w) for w in text.split()]


def test_rank_classification_picks_the_most_likely_label(frozen):
    import data
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    inputs = data.unpad(EVAL_BATCH['inputs'][:3])           # 3 examples in a batch of 4: padded
    labels = ['entailment', 'not_entailment maybe']
    preds = spot.evaluate(frozen, CFG, prompt, inputs, WordVocab(), method='rank', choices=[labels] * 3,
                          max_target_len=3, batch_size=B)
    targets = np.int32([[100, 1, 0], [101, 102, 1]])
    scores = np.stack([
        t5_model.score_targets(frozen, CFG, EVAL_BATCH['inputs'], np.tile(t, (B, 1)), prompt)[:3]
        for t in targets], 1)
    assert preds == [labels[i] for i in scores.argmax(1)]


# -------------------------------------------------------------------------------------------- initialisations
def table(V=6000, D=4, seed=0):
    embedding = np.random.default_rng(seed).normal(size=(V, D))
    return {'token_embedder': {'embedding': jnp.asarray(embedding, jnp.float32)}}


def row_ids(prompt, emb):
    """The embedding row id equal to each prompt row (-1 if none)."""
    eq = (np.asarray(prompt)[:, None, :] == np.asarray(emb)[None]).all(-1)
    return np.where(eq.any(1), eq.argmax(1), -1)


def test_sampled_vocab_rows_are_distinct_rows_below_5000():
    params = table()
    prompt = spot.init_prompt(jax.random.key(0), params, spot.PromptConfig(length=100))
    ids = row_ids(prompt, params['token_embedder']['embedding'])
    assert prompt.shape == (100, 4) and prompt.dtype == jnp.float32
    assert ids.min() >= 0 and ids.max() < 5000 and len(set(ids)) == 100
    other = spot.init_prompt(jax.random.key(1), params, spot.PromptConfig(length=100))
    assert not np.array_equal(prompt, other)


def test_class_labels_mean_pool_each_label_then_sampled_vocab():
    params = table()
    emb = np.asarray(params['token_embedder']['embedding'])
    # a 'not_entailment'-like multi-piece label, a one-piece label
    labels = [[5005, 20, 31], [7]]
    cfg = spot.PromptConfig(length=10, init='class_labels')
    prompt = np.asarray(spot.init_prompt(jax.random.key(0), params, cfg, label_ids=labels))
    np.testing.assert_allclose(prompt[0], emb[[5005, 20, 31]].mean(0), rtol=0,
                               atol=f32_atol(emb[[5005, 20, 31]], 3))
    np.testing.assert_array_equal(prompt[1], emb[7])
    rest = row_ids(prompt[2:], emb)
    assert rest.min() >= 0 and rest.max() < 5000 and len(set(rest)) == 8
    with pytest.raises(ValueError, match='class_labels'):
        spot.init_prompt(jax.random.key(0), params, spot.PromptConfig(length=1, init='class_labels'),
                         label_ids=labels)


def test_text_init_fills_first_rows():
    params = table()
    emb = np.asarray(params['token_embedder']['embedding'])
    prompt = spot.init_prompt(jax.random.key(0), params, spot.PromptConfig(length=6, init='text'),
                              text_ids=[9, 8, 5500])
    np.testing.assert_array_equal(prompt[:3], emb[[9, 8, 5500]])
    assert row_ids(prompt[3:], emb).max() < 5000


def test_uniform_init_is_the_official_u_0_half():
    cfg = spot.PromptConfig(length=100, init='uniform')
    prompt = np.asarray(spot.init_prompt(jax.random.key(0), table(), cfg))
    assert prompt.min() >= 0.0 and prompt.max() < 0.5 and abs(prompt.mean() - 0.25) < 0.02


def test_file_init_and_width_check(tmp_path):
    src = np.random.default_rng(0).normal(size=(P, 4)).astype(np.float32)
    np.save(tmp_path / 'p.npy', src)
    cfg = spot.PromptConfig(length=P, init='file', source=str(tmp_path / 'p.npy'))
    np.testing.assert_array_equal(spot.init_prompt(None, table(), cfg), src)
    with pytest.raises(ValueError, match=r'width 4 .*d_model 16'):
        spot.init_prompt(None, table(D=16), cfg)
    with pytest.raises(ValueError, match='--length=8'):
        too_long = spot.PromptConfig(length=100, init='file', source=str(tmp_path / 'p.npy'))
        spot.init_prompt(None, table(), too_long)


def test_init_prompt_refuses_what_it_would_get_silently_wrong(tmp_path):
    """Regressions: jnp indexing clamps ids >= V, so a vocab_pool above the vocabulary made 18 of 20 sampled
    rows the last row; NaN, integer, 1-D, .npz and truncated source files were accepted or failed with an
    unrelated message; labels as numpy arrays failed."""
    params, small = table(), table(V=1024)
    with pytest.raises(ValueError, match=r'vocab_pool 5000 exceeds .* 1024 rows: pass --vocab_pool=1024'):
        spot.init_prompt(jax.random.key(0), small, spot.PromptConfig(length=20))
    pooled = spot.init_prompt(jax.random.key(0), small, spot.PromptConfig(length=20, vocab_pool=1024))
    ids = row_ids(pooled, small['token_embedder']['embedding'])
    assert ids.min() >= 0 and len(set(ids)) == 20
    labels = spot.PromptConfig(length=2, init='class_labels')
    with pytest.raises(ValueError, match='got 3 labels: use --length=3 or more'):
        spot.init_prompt(jax.random.key(0), params, labels, label_ids=[[1], [2], [3]])
    emb = np.asarray(params['token_embedder']['embedding'])
    prompt = spot.init_prompt(jax.random.key(0), params, labels, label_ids=np.array([[3, 4]]))
    np.testing.assert_allclose(prompt[0], emb[[3, 4]].mean(0), rtol=0, atol=f32_atol(emb[[3, 4]], 2))
    # a text longer than P: its first P tokens
    longer = spot.init_prompt(jax.random.key(0), params, spot.PromptConfig(length=2, init='text'),
                              text_ids=np.array([9, 8, 7]))
    np.testing.assert_array_equal(longer, emb[[9, 8]])
    for name, array, match in [
            ('1d', np.zeros(4, np.float32), r'shape \(4,\): a prompt is a 2-D array .*d_model 4'),
            ('nan', np.full((P, 4), np.nan, np.float32), 'NaN or inf'),
            ('int', np.ones((P, 4), np.int32), 'dtype int32')]:
        np.save(tmp_path / f'{name}.npy', array)
        source = spot.PromptConfig(length=P, init='file', source=f'{tmp_path}/{name}.npy')
        with pytest.raises(ValueError, match=match):
            spot.init_prompt(None, params, source)
    np.savez(tmp_path / 'p.npz', prompt=np.zeros((P, 4), np.float32))
    (tmp_path / 'cut.npy').write_bytes((tmp_path / 'int.npy').read_bytes()[:90])
    for name, match in [('p.npz', r'\.npz archive'), ('cut.npy', 'cannot read source prompt .*cut.npy')]:
        source = spot.PromptConfig(length=P, init='file', source=str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            spot.init_prompt(None, params, source)
    with pytest.raises(ValueError, match=r'bad PromptConfig: length=0 \(must be >= 1\)'):
        spot.override(spot.PromptConfig(), ['--length=0'])


@pytest.mark.parametrize('task', ['sst2', 'mrpc', 'rte'])
def test_released_base_prompts_load_into_base_not_small(shared_data, task):
    path = shared_data / 'prompt_tuning_release' / 't5_1_1_lm100k_base' / f'{task}.npy'
    cfg = spot.PromptConfig(init='file', source=str(path))

    def shapes(name):                       # shapes only: no Base weights are allocated
        return jax.eval_shape(lambda k: t5_model.init_params(k, t5_model.T5Config.from_name(name)),
                              jax.random.key(0))
    prompt = spot.init_prompt(None, shapes('google/t5-base-lm-adapt'), cfg)
    assert prompt.shape == (100, 768)
    np.testing.assert_array_equal(prompt, np.load(path))
    with pytest.raises(ValueError, match=r'width 768 but the model has d_model 512'):
        spot.init_prompt(None, shapes('google/t5-small-lm-adapt'), cfg)


# ----------------------------------------------------------------------------------------------- prompt files
def one_line_naming(excinfo, path):
    """The error is one line and names the file."""
    message = str(excinfo.value)
    assert '\n' not in message and str(path) in message, message
    return message


def test_bad_prompt_files_get_one_line_naming_the_file(tmp_path):
    """Regressions (three loaders before, one now): a 0-byte file raised EOFError in `spot.py eval`; a text
    file was called 'pickled (object) data'; a truncated file did not name itself at eval."""
    good = np.zeros((P, 4), np.float32)
    np.save(tmp_path / 'good.npy', good)
    (tmp_path / 'empty.npy').write_bytes(b'')
    (tmp_path / 'cut.npy').write_bytes((tmp_path / 'good.npy').read_bytes()[:-8])   # header whole, data short
    np.save(tmp_path / 'objects.npy', np.array([{'a': 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / 'pickle.npy').write_bytes(pickle.dumps(good))
    (tmp_path / 'text.npy').write_text('0.1 0.2 0.3\n0.4 0.5 0.6\n')
    np.savez(tmp_path / 'p.npz', prompt=good)
    for name, array in [('nan', np.full((P, 4), np.nan, np.float32)), ('int', np.ones((P, 4), np.int32)),
                        ('1d', np.zeros(4, np.float32)), ('wide', np.zeros((P, 7), np.float32))]:
        np.save(tmp_path / f'{name}.npy', array)
    cases = [('empty.npy', r'is empty \(0 bytes\)'), ('cut.npy', r'truncated: .*needs 128 bytes .*holds 120'),
             ('objects.npy', r'pickled \(object\) array'), ('pickle.npy', 'is a Python pickle'),
             ('text.npy', 'is a text file, not a .npy'), ('p.npz', r'\.npz archive'),
             ('nan.npy', 'NaN or inf'), ('int.npy', 'dtype int32'),
             ('1d.npy', r'shape \(4,\): a prompt is a 2-D array'),
             ('wide.npy', r'width 7 but the model has d_model 4'), ('missing.npy', 'does not exist')]
    for name, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            spot.load_prompt(tmp_path / name, d_model=4)
        assert 'pickled' not in one_line_naming(e, tmp_path / name) or name == 'objects.npy'
    np.testing.assert_array_equal(spot.load_prompt(tmp_path / 'good.npy', 4, P), good)
    for name, match in cases[:5]:          # the same errors where a prompt enters: eval, transfer, retrieval
        with pytest.raises(SystemExit, match=match):
            spot.main(['eval', '--model', 'tiny', '--task', 'mrpc', '--prompt', str(tmp_path / name)])
        source = spot.PromptConfig(length=P, init='file', source=str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            spot.init_prompt(None, table(), source)
        lib = tmp_path / f'lib-{name}'
        lib.mkdir()
        (lib / 'x.npy').write_bytes((tmp_path / name).read_bytes())
        with pytest.raises(ValueError, match=match):
            retrieval.load_library(lib)


def test_t5x_prompt_files_load_like_npy(tmp_path):
    """The official code writes numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt with np.save
    on a file object, so without .npy (prompt-tuning, prompt_tuning/train/utils.py: np_save, save_numpy)."""
    src = np.random.default_rng(0).normal(size=(P, 4)).astype(np.float32)
    ckpt = tmp_path / 'numpy_checkpoints' / 'checkpoint_1100500'
    ckpt.mkdir(parents=True)
    with open(ckpt / 'encoder.prompt.prompt.prompt', 'wb') as f:
        np.save(f, src)
    assert os.listdir(ckpt) == [spot.T5X_PROMPT]
    for path in (ckpt / spot.T5X_PROMPT, ckpt):
        np.testing.assert_array_equal(spot.load_prompt(path, 4, P), src)
        cfg = spot.PromptConfig(length=P, init='file', source=str(path))
        np.testing.assert_array_equal(spot.init_prompt(None, table(), cfg), src)
    with pytest.raises(ValueError, match=r'width 4 but the model has d_model 16') as e:
        spot.load_prompt(ckpt, 16)
    one_line_naming(e, ckpt)
    with pytest.raises(ValueError, match="folder without adapter_config.json .*encoder.prompt.prompt.* or "
                                         "a run's prompt.npy"):
        spot.load_prompt(tmp_path)


def test_an_empty_prompt_is_refused_in_every_format(tmp_path):
    """Regression: a [0, D] prompt (.npy, a T5X prompt file, a PEFT adapter with num_virtual_tokens 0) was
    scored as a prompt."""
    from safetensors.numpy import save
    empty = np.zeros((0, 4), np.float32)
    np.save(tmp_path / 'empty.npy', empty)
    (tmp_path / 't5x').mkdir()
    with open(tmp_path / 't5x' / spot.T5X_PROMPT, 'wb') as f:
        np.save(f, empty)
    (tmp_path / 'peft').mkdir()
    (tmp_path / 'peft' / spot.PEFT_CONFIG).write_text(json.dumps(
        {'peft_type': 'PROMPT_TUNING', 'task_type': 'SEQ_2_SEQ_LM', 'num_virtual_tokens': 0}))
    (tmp_path / 'peft' / spot.PEFT_WEIGHTS).write_bytes(save({'prompt_embeddings': empty}))
    for path in (tmp_path / 'empty.npy', tmp_path / 't5x', tmp_path / 'peft'):
        with pytest.raises(ValueError, match=r'shape \(0, 4\): no rows, an empty prompt') as e:
            spot.load_prompt(path, d_model=4)
        one_line_naming(e, path)
    with pytest.raises(ValueError, match='empty prompt'):
        spot.check_prompt(jnp.zeros((0, CFG.d_model)), CFG.d_model)

TINY_HF = {'vocab_size': 64, 'd_model': 16, 'd_kv': 8, 'd_ff': 32, 'num_layers': 2, 'num_heads': 2,
           'dropout_rate': 0.0, 'decoder_start_token_id': 0, 'pad_token_id': 0, 'eos_token_id': 1}


def hf_peft():
    """(torch, transformers, peft), or a skip that says what to install."""
    for name in ('torch', 'transformers', 'peft'):
        pytest.importorskip(name, reason=f"PEFT interop needs {name}: {ORACLE_INSTALL}")
    import peft
    import torch
    import transformers
    return torch, transformers, peft


def hf_checkpoint(d, kind):
    """A tiny random T5 written as the hub has it: T5 1.0 tied (save_pretrained); T5 1.1 with its own
    lm_head.weight and tie_word_embeddings false (transformers 5.x would save an in-memory T5 1.1 tied)."""
    torch, transformers, _ = hf_peft()
    from safetensors.torch import save_file
    torch.manual_seed(0)
    untied = kind == 't5_1_1'
    cfg = transformers.T5Config(**TINY_HF, feed_forward_proj='gated-gelu' if untied else 'relu',
                                tie_word_embeddings=not untied)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    d.mkdir(parents=True)
    # At HF's init its std-1 embedding drowns the rest: every output is one token.
    if not untied:
        with torch.no_grad():
            model.shared.weight.mul_(0.1)
        model.save_pretrained(d)
        return str(d)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if 'embed_tokens' not in k}
    sd['lm_head.weight'] = torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5
    save_file(sd, str(d / 'model.safetensors'), metadata={'format': 'pt'})
    config = {k: v for k, v in model.config.to_dict().items() if k != 'scale_decoder_outputs'}
    (d / 'config.json').write_text(json.dumps({**config, 'tie_word_embeddings': False}))
    return str(d)


@pytest.mark.parametrize('kind', ['t5_1_1', 't5_1_0'])
def test_export_runs_in_peft_as_in_ours(tmp_path, kind):
    """`spot.py export` writes what PEFT's save_pretrained writes for PromptTuningConfig(SEQ_2_SEQ_LM) on the
    model, and PEFT runs it: its logits are ours with the same prompt."""
    torch, transformers, peft = hf_peft()
    d, out, Pn, S, T = hf_checkpoint(tmp_path / kind, kind), tmp_path / 'adapter', 5, 20, 6
    rng = np.random.default_rng(0)
    prompt = rng.normal(size=(Pn, TINY_HF['d_model'])).astype(np.float32)
    np.save(tmp_path / 'p.npy', prompt)
    export = ['export', '--prompt', str(tmp_path / 'p.npy'), '--model', d, '--out', str(out)]
    spot.main(export)
    with pytest.raises(SystemExit, match='holds a PEFT adapter already'):     # never overwritten
        spot.main(export)
    np.save(tmp_path / 'wide.npy', np.zeros((Pn, 7), np.float32))
    with pytest.raises(SystemExit,
                       match=r'wide.npy has shape \(5, 7\): width 7 but the model has d_model 16'):
        spot.main(['export', '--prompt', str(tmp_path / 'wide.npy'), '--model', d,
                   '--out', str(tmp_path / 'w')])
    with pytest.raises(SystemExit, match='--model tiny is a random model that PEFT cannot load'):
        spot.main(['export', '--prompt', str(tmp_path / 'p.npy'), '--model', 'tiny',
                   '--out', str(tmp_path / 'w')])
    assert not (tmp_path / 'w').exists()
    theirs = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(d),
                                 peft.PromptTuningConfig(task_type='SEQ_2_SEQ_LM', num_virtual_tokens=Pn))
    theirs.save_pretrained(tmp_path / 'theirs')

    def config(folder):
        return json.loads((folder / 'adapter_config.json').read_text())
    assert config(out) == {k: v for k, v in config(tmp_path / 'theirs').items() if k != 'peft_version'}
    from safetensors import safe_open
    with safe_open(out / 'adapter_model.safetensors', 'np') as ours, \
            safe_open(tmp_path / 'theirs' / 'adapter_model.safetensors', 'np') as ref:
        assert ours.metadata() == ref.metadata() == {'format': 'pt'}
        assert list(ours.keys()) == list(ref.keys()) == ['prompt_embeddings']
        shapes = [f.get_tensor('prompt_embeddings').shape for f in (ours, ref)]
        assert shapes == [(2 * Pn, 16)] * 2
    np.testing.assert_array_equal(spot.load_prompt(out, 16, Pn), prompt)     # and back

    base = transformers.T5ForConditionalGeneration.from_pretrained(d)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = rng.integers(2, TINY_HF['vocab_size'], (3, S))
    ids[1, 12:], ids[2, 4:] = 0, 0                                    # padded rows
    dec = rng.integers(2, TINY_HF['vocab_size'], (3, T))
    dec[:, 0] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0).long(),
                    decoder_input_ids=torch.tensor(dec)).logits.numpy()
    cfg, params = t5_model.load_checkpoint(d)
    j_ids, j_dec, j_prompt = jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32), jnp.asarray(prompt)
    ours = np.asarray(t5_model.forward(params, cfg, j_ids, j_dec, prompt=j_prompt))
    # float32 rounding of a length-n reduction stays within n eps of the values' scale; n: the longest one
    scale = np.abs(ref).max()
    tol, diff = np.finfo(np.float32).eps * max(cfg.d_ff, Pn + S) * scale, np.abs(ours - ref).max()
    print(f'{kind}: max |logit diff| PEFT vs ours {diff:.2e} (tolerance {tol:.2e}, max |logit| {scale:.2f})')
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    without = np.asarray(t5_model.forward(params, cfg, j_ids, j_dec))
    assert np.abs(without - ref).max() > 100 * tol                   # the prompt matters at this tolerance
    with torch.no_grad():                                             # PEFT's generate path prepends it too
        tokens = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0).long(),
                                max_new_tokens=T, do_sample=False, num_beams=1).numpy()[:, 1:]
    tokens = np.pad(tokens, ((0, 0), (0, T - tokens.shape[1])))      # HF stops once every row has hit EOS
    np.testing.assert_array_equal(t5_model.greedy_decode(params, cfg, j_ids, j_prompt, max_len=T), tokens)


def test_exports_to_one_folder_take_a_lock_and_never_mix(tmp_path):
    """Regression: exports released together into one folder all reported success and left one prompt's
    config beside another's weights (or a damaged safetensors file). An export locks the folder: one wins,
    the others are refused in one line, and the folder holds the winner's config and weights."""
    from safetensors.numpy import load_file
    out = tmp_path / 'adapter'
    out.mkdir()
    held = os.open(out, os.O_RDONLY)                    # another export is writing here
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match='is being written by another export: pick a new') as e:
            spot.export_peft(np.ones((3, CFG.d_model), np.float32), CFG, out, 'base')
        one_line_naming(e, out)
        assert not list(out.iterdir())
    finally:
        os.close(held)
    n, results = 8, {}
    start = threading.Barrier(n)

    def export(i):                                      # prompt i: i + 1 rows of the value i
        start.wait()
        try:
            spot.export_peft(np.full((i + 1, CFG.d_model), i, np.float32), CFG, tmp_path / 'race', f'base{i}')
            results[i] = 'ok'
        except FileExistsError as e:
            results[i] = str(e)
    threads = [threading.Thread(target=export, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [i for i, r in results.items() if r == 'ok']
    refused = [r for r in results.values() if r != 'ok']
    assert all('another export' in r or 'holds a PEFT adapter already' in r for r in refused), refused
    config = json.loads((tmp_path / 'race' / spot.PEFT_CONFIG).read_text())
    rows = load_file(tmp_path / 'race' / spot.PEFT_WEIGHTS)['prompt_embeddings']
    assert (config['base_model_name_or_path'], config['num_virtual_tokens']) == (f'base{winner}', winner + 1)
    assert rows.shape == (2 * (winner + 1), CFG.d_model) and (rows[:winner + 1] == winner).all()

def test_prompt_trained_with_peft_imports_row_for_row(tmp_path):
    """A prompt trained in PEFT, saved with save_pretrained, is read here (folder or its safetensors) as the
    encoder's rows of PEFT's prompt table: a SPoT source, an eval prompt, and back to PEFT unchanged."""
    torch, transformers, peft = hf_peft()
    d, Pn = hf_checkpoint(tmp_path / 'base', 't5_1_1'), 4
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(d),
                                peft.PromptTuningConfig(task_type='SEQ_2_SEQ_LM', num_virtual_tokens=Pn,
                                                        prompt_tuning_init='SAMPLE_VOCAB'))
    weight = model.prompt_encoder['default'].embedding.weight
    start = weight.detach().numpy().copy()
    opt = torch.optim.Adam([weight], lr=0.05)
    ids, labels = torch.randint(2, TINY_HF['vocab_size'], (4, 10)), torch.tensor([[5, 6, 1]] * 4)
    for _ in range(3):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / 'trained')
    rows = weight.detach().numpy()
    assert rows.shape == (2 * Pn, 16) and not np.allclose(rows[:Pn], start[:Pn])   # trained: the encoder's
    np.testing.assert_array_equal(rows[Pn:], start[Pn:])                            # rows only
    for path in (tmp_path / 'trained', tmp_path / 'trained' / 'adapter_model.safetensors'):
        np.testing.assert_array_equal(spot.load_prompt(path, 16, Pn), rows[:Pn])
    cfg, params = t5_model.load_checkpoint(d)
    source = spot.PromptConfig(length=Pn, init='file', source=str(tmp_path / 'trained'))
    np.testing.assert_array_equal(spot.init_prompt(None, params, source), rows[:Pn])
    with pytest.raises(ValueError, match='has 4 rows but PromptConfig.length is 100: pass --length=4'):
        spot.init_prompt(None, params, spot.PromptConfig(init='file', source=str(tmp_path / 'trained')))
    spot.export_peft(spot.load_prompt(tmp_path / 'trained'), cfg, tmp_path / 'again', d)
    again = peft.PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(d),
                                           tmp_path / 'again')
    np.testing.assert_array_equal(again.prompt_encoder['default'].embedding.weight.detach()[:Pn], rows[:Pn])


def test_peft_adapters_without_a_t5_prompt_are_refused(tmp_path):
    """LoRA, prefix tuning, a decoder-only model's prompt, another width, weights without their config: one
    line each, saying what the file is."""
    _, transformers, peft = hf_peft()
    d = hf_checkpoint(tmp_path / 'base', 't5_1_1')

    def t5():
        return transformers.T5ForConditionalGeneration.from_pretrained(d)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1))
    for name, model, config in [
            ('lora', t5(), peft.LoraConfig(task_type='SEQ_2_SEQ_LM', target_modules=['q', 'v'], r=2)),
            ('prefix', t5(), peft.PrefixTuningConfig(task_type='SEQ_2_SEQ_LM', num_virtual_tokens=3)),
            ('gpt', gpt, peft.PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=3)),
            ('t5', t5(), peft.PromptTuningConfig(task_type='SEQ_2_SEQ_LM', num_virtual_tokens=3))]:
        peft.get_peft_model(model, config).save_pretrained(tmp_path / name)
    (tmp_path / 'bare').mkdir()
    shutil.copy(tmp_path / 't5' / 'adapter_model.safetensors', tmp_path / 'bare')
    for path, match in [
            (tmp_path / 'lora', 'is a PEFT LORA adapter, not prompt tuning'),
            (tmp_path / 'prefix', 'is a PEFT PREFIX_TUNING adapter, not prompt tuning'),
            (tmp_path / 'gpt', r'PEFT prompt for a decoder-only model \(task_type CAUSAL_LM\)'),
            (tmp_path / 't5', r'PEFT prompt-tuning adapter .*: width 16 but the model has d_model'),
            (tmp_path / 'bare' / 'adapter_model.safetensors', 'no adapter_config.json beside')]:
        with pytest.raises(ValueError, match=match) as e:
            spot.load_prompt(path, d_model=32)
        one_line_naming(e, path)


class _RunsCode:
    """Unpickled, it would run a shell command (what a hostile .bin holds)."""
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f'touch {self.flag}',)


def test_hostile_or_broken_peft_bin_gets_one_line_without_unsafe_advice(tmp_path):
    """torch's weights_only loader blocks a pickle that would run code, but its message advises
    weights_only=False; that, a truncated file, text and a list instead of a dict were tracebacks. Now: one
    line naming the file, no such advice, and nothing run."""
    torch = pytest.importorskip('torch', reason=ORACLE_INSTALL)
    config = {'peft_type': 'PROMPT_TUNING', 'task_type': 'SEQ_2_SEQ_LM', 'num_virtual_tokens': 2}
    good = {'prompt_embeddings': torch.zeros(4, 16)}
    torch.save(good, tmp_path / 'good.bin')
    hostile = {'prompt_embeddings': _RunsCode(tmp_path / 'ran')}
    cases = {'hostile': (hostile, 'would import posix.system, which can run code'),
             'cut': ((tmp_path / 'good.bin').read_bytes()[:300], 'not a readable PyTorch checkpoint'),
             'text': (b'not a checkpoint\n', 'not a readable PyTorch checkpoint'),
             'list': ([torch.zeros(4, 16)], 'holds a list, not a dict of tensors'),
             'number': ({'prompt_embeddings': 3}, "'prompt_embeddings' is of type int, not a tensor")}
    for name, (content, match) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / spot.PEFT_CONFIG).write_text(json.dumps(config))
        path = tmp_path / name / 'adapter_model.bin'
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(ValueError, match=match) as e:
            spot.load_prompt(tmp_path / name, d_model=16)
        assert 'weights_only' not in one_line_naming(e, path)
        with pytest.raises(SystemExit, match=match) as e:
            spot.main(['eval', '--model', 'tiny', '--task', 'mrpc', '--prompt', str(tmp_path / name)])
        assert 'weights_only' not in str(e.value) and not (tmp_path / 'ran').exists()


# --------------------------------------------------------------------------------------------------- the loop
def run(out, frozen, batches, **kw):
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    return spot.train_prompt(prompt, frozen, CFG, TC, batches, evaluator(frozen), out, log=quiet, **kw)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, frozen):
    lines = []
    full = run(tmp_path / 'full', frozen, synthetic_batches(), meta={'task': 'toy'})
    with pytest.raises(RuntimeError, match='preempted'):
        run(tmp_path / 'cut', frozen, synthetic_batches(crash_at=10))     # dies after the step-8 checkpoint
    _, _, state = spot.load_checkpoint(tmp_path / 'cut' / 'checkpoint.npz', spot.make_optimizer(TC.optimizer))
    assert state['step'] == state['data_position'] == 8
    resumed = run(tmp_path / 'cut', frozen, synthetic_batches(), resume=True, meta={'task': 'toy'})
    # already done: loads, no step runs
    resumed_log = spot.train_prompt(resumed['prompt'], frozen, CFG, TC, synthetic_batches(), None,
                                    tmp_path / 'cut', resume=True, log=lines.append)
    assert resumed['losses'] == full['losses'][8:] and resumed_log['losses'] == []
    assert leaves_bytes(resumed['prompt']) == leaves_bytes(full['prompt'])
    assert leaves_bytes(resumed['opt_state']) == leaves_bytes(full['opt_state'])
    for name in ('prompt', 'prompt_step6', 'checkpoint'):
        suffix = '.npz' if name == 'checkpoint' else '.npy'
        a, b = (np.load(d / f'{name}{suffix}') for d in (tmp_path / 'full', tmp_path / 'cut'))
        for k in (a.files if suffix == '.npz' else [None]):
            assert (a[k] if k else a).tobytes() == (b[k] if k else b).tobytes(), (name, k)
    info = json.loads((tmp_path / 'full' / 'prompt.json').read_text())
    assert info['task'] == 'toy' and info['step'] == full['best_step'] and info['score'] == full['best_score']
    assert info['config']['train']['steps'] == 12
    assert np.load(tmp_path / 'full' / 'prompt.npy').dtype == np.float32
    assert not list((tmp_path / 'cut').glob('*.tmp'))
    assert 'resuming' in lines[0]
    before = (tmp_path / 'cut' / 'checkpoint.npz').read_bytes()
    with pytest.raises(FileExistsError, match='--resume'):        # the same command without resume: refused
        run(tmp_path / 'cut', frozen, synthetic_batches())
    assert (tmp_path / 'cut' / 'checkpoint.npz').read_bytes() == before


def test_a_failing_evaluation_loses_no_training_and_resume_redoes_it(tmp_path, frozen):
    full = run(tmp_path / 'full', frozen, synthetic_batches())
    good, calls = evaluator(frozen), []

    def flaky(prompt):                          # e.g. out of memory in the evaluation at step 8
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError('evaluation ran out of memory')
        return good(prompt)
    with pytest.raises(MemoryError):
        spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, TC,
                          synthetic_batches(), flaky, tmp_path / 'cut', log=quiet)
    _, _, state = spot.load_checkpoint(tmp_path / 'cut' / 'checkpoint.npz', spot.make_optimizer(TC.optimizer))
    assert state['step'] == 8 and state['eval_pending']       # the 8 steps are saved, their evaluation not
    resumed = run(tmp_path / 'cut', frozen, synthetic_batches(), resume=True)   # evaluates step 8 first
    assert (resumed['best_step'], resumed['best_score']) == (full['best_step'], full['best_score'])
    for name in ('prompt.npy', 'checkpoint.npz'):
        a, b = (np.load(d / name) for d in (tmp_path / 'full', tmp_path / 'cut'))
        for k in (a.files if name.endswith('.npz') else [None]):
            assert (a[k] if k else a).tobytes() == (b[k] if k else b).tobytes(), (name, k)


def test_prompt_json_is_strict_json_when_the_score_is_nan(tmp_path, frozen):
    def nan_eval(prompt):                                       # constant predictions
        return {'score': np.float32('nan'), 'pearson': float('nan')}

    spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG,
                      dataclasses.replace(TC, steps=4), synthetic_batches(), nan_eval, tmp_path, log=quiet)

    def refuse(name):
        raise ValueError(f'{name} in prompt.json')
    info = json.loads((tmp_path / 'prompt.json').read_text(), parse_constant=refuse)
    assert info['score'] is None and info['metrics'] == {'score': None, 'pearson': None} and info['step'] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, frozen):
    emb = np.array(frozen['token_embedder']['embedding'])
    emb[POISON] = np.nan
    poisoned = {**frozen, 'token_embedder': {'embedding': jnp.asarray(emb)}}
    data = synthetic_batches(poison_from=6)
    with pytest.raises(FloatingPointError, match=r'loss is nan at step 7.*checkpoint\.npz \(step 4\)'):
        run(tmp_path / 'run', poisoned, data)
    ckpt = tmp_path / 'run' / 'checkpoint.npz'
    prompt, _, state = spot.load_checkpoint(ckpt, spot.make_optimizer(TC.optimizer))
    assert state['step'] == 4 and np.isfinite(np.asarray(prompt)).all()
    # The checkpoint is resumable: with a repaired model the run ends bit-identical to a clean run.
    resumed = run(tmp_path / 'run', frozen, data, resume=True)
    clean = run(tmp_path / 'clean', frozen, data)
    assert leaves_bytes(resumed['prompt']) == leaves_bytes(clean['prompt'])


def test_resume_refuses_changed_settings(tmp_path, frozen):
    spot.save_checkpoint(tmp_path / 'checkpoint.npz', jnp.zeros((P, CFG.d_model)),
                         spot.make_optimizer(TC.optimizer).init(jnp.zeros((P, CFG.d_model))),
                         {'step': 4, 'data_position': 4, 'seed': 0, 'best_score': None, 'best_step': None,
                          'run': {}, 'config': dataclasses.asdict(dataclasses.replace(
                              TC, optimizer=spot.OptimizerConfig(learning_rate=0.1)))})
    with pytest.raises(ValueError, match='learning_rate'):
        run(tmp_path, frozen, synthetic_batches(), resume=True)


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, frozen):
    """Regression: --resume --steps 4 on a 12-step checkpoint ran nothing, exited 0 and rewrote prompt.json's
    config to 4 steps for a prompt trained longer."""
    run(tmp_path, frozen, synthetic_batches())
    def files():                                                # run.lock: who holds the folder, and since
        return {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name != 'run.lock'}
    before = files()
    with pytest.raises(ValueError, match=r'checkpoint.npz is at step 12, past steps=4: resume with --steps '
                                         r'>= 12') as e:
        spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG,
                          dataclasses.replace(TC, steps=4), synthetic_batches(), None, tmp_path, resume=True,
                          log=quiet)
    one_line_naming(e, tmp_path / 'checkpoint.npz')
    assert files() == before


def test_override_parses_and_type_checks():
    tc, rest = spot.override(spot.TrainConfig(),
                             ['--steps=30000', '--learning-rate=1', '--eval_method=rank', '--x=1'])
    assert (tc.steps, tc.optimizer.learning_rate, tc.eval_method, rest) == (30000, 1.0, 'rank', ['--x=1'])
    with pytest.raises(ValueError, match='TrainConfig.steps expects int, got float'):
        spot.override(tc, ['--steps=0.5'])
    # a str field keeps its text
    assert spot.override(spot.PromptConfig(), ['--text=1984'])[0].text == '1984'


def test_settings_that_would_fail_late_fail_first(tmp_path, capsys):
    """Regressions: eval_every/checkpoint_every/log_every 0 divided by zero after the first step, a mistyped
    eval_method failed at the first evaluation (step 500), `--steps 0` trained for the default 2^18 steps,
    make_mesh(0) divided by zero."""
    for arg, problem in [('eval_every=0', 'eval_every=0'), ('checkpoint_every=0', 'checkpoint_every=0'),
                         ('log_every=0', 'log_every=0'), ('batch_size=0', 'batch_size=0'),
                         ('eval_method=ranks', "eval_method='ranks' (must be 'decode' or 'rank')")]:
        with pytest.raises(ValueError, match=f'bad TrainConfig: {re.escape(problem)}'):
            spot.override(spot.TrainConfig(), [f'--{arg}'])
    common = ['train', '--model', 'tiny', '--task', 'mrpc', '--out', str(tmp_path)]
    with pytest.raises(SystemExit):                                 # argparse usage error, no traceback
        spot.main([*common, '--eval_every=0'])
    assert 'eval_every=0 (must be >= 1)' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        spot.main([*common, '--steps', '0'])
    assert 'steps=0 (must be >= 1)' in capsys.readouterr().err
    with pytest.raises(ValueError, match='--model-parallel 0 does not divide'):
        spot.make_mesh(0)
    # Regressions: dropout 1.0 / 1.5 / -0.5 raised OverflowError from JAX after the model and data loaded, and
    # --learning_rate=nan said "expects float, got str".
    for arg, problem in [('dropout=1.0', 'dropout=1.0 (must be in [0, 1))'), ('dropout=1.5', 'dropout=1.5'),
                         ('dropout=-0.5', 'dropout=-0.5'),
                         ('learning_rate=nan', 'learning_rate=nan (must be finite'),
                         ('learning_rate=0', 'learning_rate=0.0'), ('learning_rate=inf', 'learning_rate=inf'),
                         ('max_input_len=1', 'max_input_len=1 (must be >= 2: one token and EOS)'),
                         ('max_target_len=1', 'max_target_len=1'), ('decay_rate=0', 'decay_rate=0.0')]:
        with pytest.raises(ValueError, match=f'bad (Train|Optimizer)Config: {re.escape(problem)}'):
            spot.override(spot.TrainConfig(), [f'--{arg}'])
    assert spot.override(spot.TrainConfig(), ['--max_target_len=2', '--dropout=0'])[0].dropout == 0.0


def test_resume_refuses_another_run_and_a_damaged_checkpoint(tmp_path, frozen):
    """Regressions: resuming with another task, model, model weights or prompt length went on silently (a MRPC
    prompt kept training on RTE); a truncated checkpoint.npz raised zipfile.BadZipFile; an evaluator's
    np.float32 score broke the JSON."""
    meta, prompt = {'task': 'toy', 'model': 'tiny'}, spot.init_prompt(jax.random.key(1), frozen, PC)

    def numpy_score(p):
        return {'score': np.float32(evaluator(frozen)(p)['score'])}
    spot.train_prompt(prompt, frozen, CFG, dataclasses.replace(TC, steps=1), synthetic_batches(), numpy_score,
                      tmp_path, meta=meta, log=quiet)
    assert json.loads((tmp_path / 'prompt.json').read_text())['step'] == 1

    def resume(prompt=prompt, cfg=CFG, **changes):
        return spot.train_prompt(prompt, frozen, cfg, TC, synthetic_batches(), None, tmp_path,
                                 meta={**meta, **changes}, resume=True, log=quiet)
    with pytest.raises(ValueError, match=r"'meta.task': \('toy', 'rte'\)"):
        resume(task='rte')
    with pytest.raises(ValueError, match=r"'model.d_kv': \(8, 4\), 'model.num_heads': \(2, 4\)"):
        resume(cfg=dataclasses.replace(CFG, num_heads=4, d_kv=4))
    with pytest.raises(ValueError, match=r"'prompt shape': \(\(8, 16\), \(10, 16\)\)"):
        resume(prompt=jnp.zeros((10, CFG.d_model)))
    # same architecture, other weights (T5 1.1 vs LM-adapted)
    other = jax.tree.map(lambda x: x * 1.5, frozen)
    with pytest.raises(ValueError, match=r"'model.weights': \('[0-9a-f]{16}', '[0-9a-f]{16}'\)"):
        spot.train_prompt(prompt, other, CFG, TC, synthetic_batches(), None, tmp_path, meta=meta,
                          resume=True)
    ckpt = tmp_path / 'checkpoint.npz'
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match=r'checkpoint.npz is not a readable checkpoint \(BadZipFile'):
        resume()


def test_a_nan_prompt_after_a_finite_loss_is_never_saved(tmp_path, frozen, monkeypatch):
    """A NaN/inf gradient can leave the loss finite and the prompt NaN (Adafactor: inf / sqrt(inf)).
    Regression: that prompt became the 'last good' checkpoint, prompt.npy and prompt_step6.npy; the step-4
    checkpoint must survive."""
    real, calls = spot.train_step, []

    def nan_at_step_6(*args):
        prompt, opt_state, loss = real(*args)
        calls.append(len(calls) + 1)
        return (prompt * jnp.nan if calls[-1] == 6 else prompt), opt_state, loss
    monkeypatch.setattr(spot, 'train_step', nan_at_step_6)
    with pytest.raises(FloatingPointError,
                       match=r'prompt has NaN or inf values after step 6 .*\(step 4\) is intact'):
        run(tmp_path, frozen, synthetic_batches())
    prompt, _, state = spot.load_checkpoint(tmp_path / 'checkpoint.npz', spot.make_optimizer(TC.optimizer))
    assert state['step'] == 4 and np.isfinite(np.asarray(prompt)).all()
    assert np.isfinite(np.load(tmp_path / 'prompt.npy')).all()
    assert not (tmp_path / 'prompt_step6.npy').exists()


# --------------------------------------------------------------------------------------------- the run folder
def test_a_run_owns_its_folder_and_a_crashed_holder_leaves_no_stale_lock(tmp_path, frozen):
    """Regression: two runs on one folder both ran and left one run's checkpoint beside the other's
    prompt.npy."""
    in_use = rf'{re.escape(str(tmp_path))} is in use by .*pid {os.getpid()}'
    with spot.own_folder(tmp_path):                               # another run holds the folder ...
        with pytest.raises(spot.RunFolderInUse, match=in_use):
            run(tmp_path, frozen, synthetic_batches())
    assert not (tmp_path / 'checkpoint.npz').exists()
    holder_code = ('import sys, time, spot\n'
                   'from pathlib import Path\n'
                   'with spot.own_folder(Path(sys.argv[1])):\n'
                   '    print("locked", flush=True)\n'
                   '    time.sleep(60)\n')
    holder = subprocess.Popen([sys.executable, '-c', holder_code, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(spot.RunFolderInUse, match=f'pid {holder.pid} '):
            run(tmp_path, frozen, synthetic_batches())
    finally:
        holder.kill()                                            # a crash: no cleanup code runs ...
        holder.wait()
    assert run(tmp_path, frozen, synthetic_batches())['step'] == TC.steps   # ... and the folder is free again


def test_a_new_run_never_replaces_an_earlier_runs_prompt(tmp_path, frozen):
    """Regression: the damaged-checkpoint advice was to delete checkpoint.npz; a new run in that folder then
    overwrote the best prompt.npy. Leftover *.tmp of an interrupted write are removed at the next start."""
    run(tmp_path, frozen, synthetic_batches(), meta={'task': 'toy'})
    best = (tmp_path / 'prompt.npy').read_bytes()
    ckpt = tmp_path / 'checkpoint.npz'
    ckpt.write_bytes(ckpt.read_bytes()[:200])                     # damaged
    with pytest.raises(ValueError, match='not a readable checkpoint.*best prompt so far stays in '
                                         '.*prompt.npy: keep that folder as it is and start a new run '
                                         'with another --out'):
        run(tmp_path, frozen, synthetic_batches(), resume=True, meta={'task': 'toy'})
    ckpt.unlink()                                                 # the old advice
    (tmp_path / 'checkpoint.npz.tmp').write_bytes(b'half a file')
    for resume in (False, True):
        with pytest.raises(FileExistsError, match='holds metrics.jsonl, prompt.json, prompt.npy, '
                                                  'prompt_step6.json, prompt_step6.npy, files a run writes, '
                                                  'but no checkpoint.npz.*pick a new --out'):
            run(tmp_path, frozen, synthetic_batches(), resume=resume)
    assert (tmp_path / 'prompt.npy').read_bytes() == best
    assert not (tmp_path / 'checkpoint.npz.tmp').exists()


def test_a_run_leaves_files_it_did_not_write_alone_and_refuses_its_names(tmp_path, frozen):
    """Regression: every top-level *.tmp in --out was deleted, and a user's prompt.json and run.lock were
    replaced. A run writes only its own names (RUN_FILES, prompt_step<N>, run.lock, and <each>.tmp); other
    files stay as they are, and a file of the run's names that no run wrote is refused, untouched."""
    mine = {'thesis.tmp': b'x', 'notes.txt': b'n', 'prompt.npy.bak': b'b'}
    for user_file in ({'prompt.json': b'y'}, {'run.lock': b'my lock\n'}, {}):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        for name, text in {**mine, **user_file, 'checkpoint.npz.tmp': b'half a write'}.items():
            (out / name).write_bytes(text)
        if user_file:
            [(name, text)] = user_file.items()
            with pytest.raises(FileExistsError, match=f'{name}(, files a run writes| was not written by a '
                                                      f'run).*move (them|that file) away') as e:
                run(out, frozen, synthetic_batches())
            one_line_naming(e, out)
            assert (out / name).read_bytes() == text and not (out / 'checkpoint.npz').exists()
        else:
            assert run(out, frozen, synthetic_batches())['step'] == TC.steps
            assert not (out / 'checkpoint.npz.tmp').exists()           # the run's own leftover: removed
        assert {name: (out / name).read_bytes() for name in mine} == mine


def test_resume_starts_again_a_run_that_stopped_before_its_first_checkpoint(tmp_path, frozen):
    """Regression: a crash (kill -9, out of memory) after the first progress line and before the first
    checkpoint left a folder that both --resume and a new run refused, so a scheduler's requeue with --resume
    failed forever. --resume starts it again at step 0, dropping the stale history, and says so."""
    tc = dataclasses.replace(TC, log_every=1)

    def train(batches, **kw):
        return spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, tc, batches,
                                 evaluator(frozen), tmp_path, **kw)
    with pytest.raises(RuntimeError, match='preempted'):
        train(synthetic_batches(crash_at=3), log=quiet)                  # 3 steps logged, no checkpoint
    assert sorted(f.name for f in tmp_path.iterdir()) == ['metrics.jsonl']      # run.lock removed
    with pytest.raises(FileExistsError, match='stopped before its first checkpoint: start it again from '
                                              'step 0 with --resume'):
        train(synthetic_batches(), log=quiet)
    lines = []
    assert train(synthetic_batches(), resume=True, log=lines.append)['step'] == TC.steps
    assert 'dropped its metrics.jsonl (3 lines)' in lines[0] and 'starting at step 0' in lines[1], lines
    events = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [(e['step'], 'eval' in e) for e in events] == [(s, e) for s in range(1, 13) for e in (False, True)
                                                          if not e or s % 4 == 0]

def test_history_and_prompt_json_after_resume(tmp_path, frozen):
    """metrics.jsonl holds one line per log line and evaluation; a resume cuts it back to the checkpoint, so
    it equals an uninterrupted run's (but for the measured rates), also when the run died during an
    evaluation. prompt.json follows a resume that extends the run (its config.train.steps)."""
    def history(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ('steps_per_s', 'time')}
                for line in (d / 'metrics.jsonl').read_text().splitlines()]
    run(tmp_path / 'full', frozen, synthetic_batches())
    full = history(tmp_path / 'full')
    assert [(e['step'], 'eval' in e) for e in full] == [(s, e) for s in (4, 8, 12) for e in (False, True)]
    assert all(np.isfinite(e['loss']) for e in full if 'loss' in e)
    with pytest.raises(RuntimeError, match='preempted'):
        run(tmp_path / 'cut', frozen, synthetic_batches(crash_at=10))     # after the step-8 evaluation
    calls, ev = [], evaluator(frozen)

    def dies_at_step_8(prompt):                                           # dies inside the step-8 evaluation
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError
        return ev(prompt)
    with pytest.raises(MemoryError):
        spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, TC,
                          synthetic_batches(), dies_at_step_8, tmp_path / 'in_eval', log=quiet)
    for d in ('cut', 'in_eval'):
        run(tmp_path / d, frozen, synthetic_batches(), resume=True)
        assert history(tmp_path / d) == full, d
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    spot.train_prompt(prompt, frozen, CFG, dataclasses.replace(TC, steps=16), synthetic_batches(),
                      lambda p: {'score': -1e9}, tmp_path / 'full', resume=True, log=quiet)   # no new best
    info = json.loads((tmp_path / 'full' / 'prompt.json').read_text())
    assert info['config']['train']['steps'] == 16 and info['step'] <= 12
    assert [e['step'] for e in history(tmp_path / 'full')][-2:] == [16, 16]


def test_resume_drops_a_torn_last_history_line_and_names_a_damaged_one(tmp_path, frozen):
    """Regression: a torn last line of metrics.jsonl (a full disk, a crash inside the write) blocked --resume
    with a JSON error naming no file. Now it is dropped, and said; a damaged line before the last is refused
    in one line naming the file and the line."""
    with pytest.raises(RuntimeError, match='preempted'):
        run(tmp_path, frozen, synthetic_batches(crash_at=10))              # checkpoint at step 8
    history = tmp_path / 'metrics.jsonl'
    good = history.read_bytes()
    history.write_bytes(good + b'{"step": 9, "loss": 2.')
    lines = []
    spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, TC, synthetic_batches(),
                      evaluator(frozen), tmp_path, resume=True, log=lines.append)
    assert any(f'{history}: dropped its last line, cut short' in line for line in lines), lines
    events = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(e['step'], 'eval' in e) for e in events] == [(s, e) for s in (4, 8, 12) for e in (False, True)]
    damaged = good.splitlines(keepends=True)
    damaged[1] = b'{"step": 4, "ev\n'
    history.write_bytes(b''.join(damaged))
    with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not an event of a run .*: repair or '
                                         r'delete that line') as e:
        run(tmp_path, frozen, synthetic_batches(), resume=True)
    one_line_naming(e, history)
    assert history.read_bytes() == b''.join(damaged)


class _SignalOnRead(dict):
    """A batch that sends the process a signal when the training loop reads it (train_prompt prefetches
    batches on another thread: the signal comes as the loop takes it, not as it is made)."""
    signum = None

    def items(self):
        os.kill(os.getpid(), self.signum)
        return super().items()


def interrupting_batches(signum, at):
    """synthetic_batches whose batch `at` is taken by the loop while the process receives signum (as from
    Ctrl-C or kill)."""
    def batches(start):
        for k, batch in zip(itertools.count(start), synthetic_batches()(start)):
            if k == at:
                batch = _SignalOnRead(batch)
                batch.signum = signum
            yield batch
    return batches


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, frozen, signum):
    """Regression: Ctrl-C near an evaluation was swallowed by JAX's gc callback and the run went on to
    rc 0."""
    full = run(tmp_path / 'full', frozen, synthetic_batches())
    lines = []
    with pytest.raises(spot.Interrupted, match=r'after step 6: .*checkpoint.npz holds it; rerun the same '
                                               r'command with --resume') as stopped:
        spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, TC,
                          interrupting_batches(signum, 5), evaluator(frozen), tmp_path / 'cut',
                          log=lines.append)
    assert stopped.value.exit_code == 128 + signum and 'stopping after this step' in lines[-1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # handlers restored
    _, _, state = spot.load_checkpoint(tmp_path / 'cut' / 'checkpoint.npz', spot.make_optimizer(TC.optimizer))
    assert state['step'] == 6
    resumed = run(tmp_path / 'cut', frozen, synthetic_batches(), resume=True)
    assert leaves_bytes(resumed['prompt']) == leaves_bytes(full['prompt'])
    assert leaves_bytes(resumed['opt_state']) == leaves_bytes(full['opt_state'])


def test_ctrl_c_on_the_command_line_exits_130_and_resumes_to_the_same_bits(shared_data, tmp_path):
    """A real SIGINT from outside, while `spot.py train` runs: exit 130 with the resume hint, then --resume
    ends where an uninterrupted run ends."""
    cmd = [sys.executable, 'spot.py', 'train', '--model', 'tiny', '--task', 'sst2',
           '--data', str(shared_data / 'glue'), '--vocab', str(shared_data / 't5_spiece.model'),
           '--steps', '1500', '--batch_size=2', '--length=4', '--max_input_len=16', '--log_every=25',
           '--eval_every=1000000', '--eval_limit=4', '--eval_batch_size=4']
    child = subprocess.Popen([*cmd, '--out', str(tmp_path / 'cut')], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stdout:                                  # training has started
        if line.startswith('step 25/'):
            break
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert 'rerun the same command with --resume' in err and 'Traceback' not in err
    subprocess.run([*cmd, '--out', str(tmp_path / 'cut'), '--resume'], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run([*cmd, '--out', str(tmp_path / 'full')], cwd=ROOT, check=True, capture_output=True)
    for name in ('prompt.npy', 'checkpoint.npz'):
        a, b = (np.load(tmp_path / d / name) for d in ('full', 'cut'))
        for k in (a.files if name.endswith('.npz') else [None]):
            if k != 'state':
                assert (a[k] if k else a).tobytes() == (b[k] if k else b).tobytes(), (name, k)


def catches(pid: int, signum: int) -> bool:
    """Whether process pid has a handler for signum (Linux /proc): SIGTERM's is set by stop_requests."""
    mask = next(line for line in Path(f'/proc/{pid}/status').read_text().splitlines()
                if line.startswith('SigCgt:'))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='reads signal masks from Linux /proc')
def test_a_second_ctrl_c_during_the_first_compile_exits_130_without_a_crash(shared_data, tmp_path):
    """Regression: two Ctrl-C during the first compile raised KeyboardInterrupt while XLA was compiling, and
    the interpreter's exit then crashed (exit -11, 1-5 s after 'interrupted'). Now the second one prints one
    line and leaves with os._exit(130). Two tries: signals just after train_prompt began, and in the compile
    of the first step."""
    cmd = [sys.executable, 'spot.py', 'train', '--model', 'tiny', '--task', 'sst2', '--no-compile-cache',
           '--data', str(shared_data / 'glue'), '--vocab', str(shared_data / 't5_spiece.model'),
           '--steps', '1000', '--batch_size=2', '--length=4', '--max_input_len=16', '--log_every=1']
    for k, delay in enumerate((0.2, 1.0)):       # here the first compile takes 3-5 s
        child = subprocess.Popen([*cmd, '--out', str(tmp_path / str(k))], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            while not catches(child.pid, signal.SIGTERM):              # train_prompt's handlers are set
                assert child.poll() is None, child.communicate()
                time.sleep(0.02)
            time.sleep(delay)
            child.send_signal(signal.SIGINT)
            time.sleep(0.1)
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=60)
        finally:
            child.kill()
        assert child.returncode == 130, (delay, child.returncode, err)
        assert err.strip().splitlines()[-1].startswith('SIGINT again: stopped at once'), err
        assert 'Traceback' not in err, err

# --------------------------------------------------------------------------------------------------- sharding
SHARDED = r'''
import json, numpy as np, jax, jax.numpy as jnp
import spot, t5_model
# cfg: 1+1 layers, for a fast compile
cfg, tc = t5_model.T5Config.tiny(num_layers=1, num_decoder_layers=1), spot.TrainConfig()
frozen = t5_model.init_params(jax.random.key(0), cfg)
rng = np.random.default_rng(0)
batch = {'inputs': rng.integers(2, 5000, (8, 10)).astype(np.int32),
         'targets': rng.integers(2, 5000, (8, 3)).astype(np.int32)}
batch['inputs'][:, 7:] = 0
prompt0 = rng.normal(size=(8, 16)).astype(np.float32)

def two_steps(mesh):
    prompt = jnp.asarray(prompt0)
    state = spot.make_optimizer(tc.optimizer).init(prompt)
    f, b = spot.shard_params(mesh, frozen), spot.shard_batch(mesh, batch)
    p, s = spot.replicate(mesh, (prompt, state))
    losses = []
    for step in range(2):
        p, s, loss = spot.train_step(p, s, f, b, spot.dropout_key(0, step), cfg, tc.optimizer, tc.z_loss)
        losses.append(float(loss))
    return f, b, p, s, losses

_, _, p1, s1, l1 = two_steps(None)
mesh = spot.make_mesh(model_parallel=2)
f, b, p8, s8, l8 = two_steps(mesh)
try:
    spot.shard_batch(mesh, {k: v[:6] for k, v in batch.items()})
    bad_batch = ''
except ValueError as e:
    bad_batch = str(e)

def diff(x, y):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))

def group_step(mesh):    # two runs in one step (spot.train_prompts): the batch split over 'data' on axis 1
    prompts = jnp.stack([prompt0, prompt0[::-1]])
    states = jax.tree.map(lambda x: jnp.stack([x, x]), spot.make_optimizer(tc.optimizer).init(prompts[0]))
    b = spot.shard_batch(mesh, {k: np.stack([v, v[::-1]]) for k, v in batch.items()}, runs_axis=True)
    p, s = spot.replicate(mesh, (prompts, states))
    keys = jnp.stack([spot.dropout_key(0, 0), spot.dropout_key(1, 0)])
    p, s, loss = spot.train_step(p, s, spot.shard_params(mesh, frozen), b, keys, cfg, tc.optimizer, tc.z_loss)
    return b, p, loss

_, gp1, gl1 = group_step(None)
gb8, gp8, gl8 = group_step(mesh)

print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape),
    "query": str(f['encoder']['layers']['attention']['query']['kernel'].sharding.spec),
    "wo": str(f['encoder']['layers']['mlp']['wo']['kernel'].sharding.spec),
    "embedding": str(f['token_embedder']['embedding'].sharding.spec),
    "batch": str(b['inputs'].sharding.spec), "loss_diff": max(abs(u - v) for u, v in zip(l1, l8)),
    "prompt_diff": diff(p1, p8), "opt_diff": diff(s1, s8), "moved": diff(p1, prompt0),
    "scales": [max(map(abs, l1)),
               *(float(np.max(np.abs(np.asarray(x)))) for x in (p1, *jax.tree.leaves(s1)))],
    "bad_batch": bad_batch, "group_batch": str(gb8['inputs'].sharding.spec),
    "group_loss_diff": diff(gl1, gl8), "group_prompt_diff": diff(gp1, gp8)}))
'''


@pytest.fixture(scope='module', autouse=True)
def sharded_run(request):
    """Starts the 8-device subprocess when the module starts (if its test is selected), so that it compiles
    while the other tests run; XLA_FLAGS must be set before jax is imported, hence a fresh process."""
    if not any(item.name == 'test_sharded_step_equals_single_device' for item in request.session.items):
        yield None
        return
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu',
           'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests')])}
    proc = subprocess.Popen([sys.executable, '-c', SHARDED], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield proc
    proc.kill()


def test_sharded_step_equals_single_device(sharded_run):
    stdout, stderr = sharded_run.communicate(timeout=300)
    assert sharded_run.returncode == 0, stderr[-3000:]
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r['devices'] == 8 and r['mesh'] == {'data': 4, 'model': 2}
    assert "'model'" in r['query'] and "'model'" in r['wo'] and "'model'" in r['embedding']
    assert "'data'" in r['batch']
    assert r['moved'] > 0.1                       # the steps did something
    # The same sums over other splits of the batch and the weights: float32 rounding of the 1+1-layer network
    # (18 positions), twice for the optimizer's squared gradients.
    n = network_roundings(t5_model.T5Config.tiny(num_layers=1, num_decoder_layers=1), 18)
    loss_scale, prompt_scale, *opt_scales = r['scales']
    assert r['loss_diff'] <= f32_atol(loss_scale, n) and r['prompt_diff'] <= f32_atol(prompt_scale, n), r
    assert r['opt_diff'] <= f32_atol(max(opt_scales), 2 * n), r
    assert 'batch size 6 is not divisible by the 4 data-parallel devices' in r['bad_batch']
    # two runs sharing a step on the mesh (each run's batch split over 'data'): as on one device
    assert r['group_batch'].endswith("(None, 'data')"), r['group_batch']
    assert r['group_loss_diff'] <= f32_atol(loss_scale, n), r
    assert r['group_prompt_diff'] <= f32_atol(prompt_scale, n), r


def test_cli_prints_the_backend_and_computes_in_bfloat16_on_request(shared_data, tmp_path, capsys):
    """A run meant for a GPU must not go on unnoticed on the CPU; --dtype bfloat16 is the official runs'
    compute dtype (the frozen weights in bfloat16, the prompt and its optimizer float32)."""
    calls = []
    real = spot.train_step

    def spy(prompt, opt_state, frozen, *rest):
        calls.append((prompt.dtype, frozen['encoder']['layers']['mlp']['wo']['kernel'].dtype))
        return real(prompt, opt_state, frozen, *rest)
    spot.train_step = spy
    try:
        spot.main(['train', '--model', 'tiny', '--task', 'mrpc', '--data', str(shared_data / 'glue'),
                   '--vocab', str(shared_data / 't5_spiece.model'), '--steps', '2', '--out', str(tmp_path),
                   '--dtype', 'bfloat16', '--batch_size=4', '--eval_every=2', '--eval_limit=8',
                   '--eval_batch_size=8', '--max_input_len=48', '--length=5'])
    finally:
        spot.train_step = real
    out = capsys.readouterr().out
    backend_line = rf'JAX {re.escape(jax.__version__)}: \d+ .* device\(s\), backend {jax.default_backend()}'
    assert re.search(backend_line, out)
    assert calls and set(calls) == {(np.dtype(jnp.float32), np.dtype(jnp.bfloat16))}
    prompt = np.load(tmp_path / 'prompt.npy')
    assert prompt.dtype == np.float32 and np.isfinite(prompt).all()
    assert json.loads((tmp_path / 'prompt.json').read_text())['dtype'] == 'bfloat16'


def test_cli_train_resume_eval_and_bad_input(shared_data, tmp_path, capsys):
    common = ['--model', 'tiny', '--task', 'mrpc', '--data', str(shared_data / 'glue'),
              '--vocab', str(shared_data / 't5_spiece.model')]
    small = ['--batch_size=4', '--eval_every=2', '--eval_limit=8', '--eval_batch_size=8',
             '--max_input_len=48', '--length=5']
    spot.main(['train', *common, '--steps', '2', '--out', str(tmp_path), *small])
    spot.main(['train', *common, '--steps', '4', '--out', str(tmp_path), '--resume', *small])
    out = capsys.readouterr().out
    assert 'resuming' in out and 'at step 2' in out and 'best score' in out
    info = json.loads((tmp_path / 'prompt.json').read_text())
    assert info['task'] == 'mrpc' and info['step'] in (2, 4)
    assert set(info['metrics']) == {'accuracy', 'f1', 'score'}
    assert np.load(tmp_path / 'prompt.npy').shape == (5, t5_model.T5Config.tiny().d_model)
    spot.main(['eval', *common, '--prompt', str(tmp_path / 'prompt.npy'), '--eval_limit=8',
               '--max_input_len=48', '--eval_batch_size=4'])
    out = capsys.readouterr().out
    scores = json.loads(out.strip().splitlines()[-1])
    assert 0 <= scores['accuracy'] <= 100
    assert 'loading the weights of a random tiny T5 (float32)' in out and 'loaded ' in out
    assert re.search(r'evaluating .*prompt\.npy on mrpc validation: 8 examples', out)
    assert 'mrpc validation: 4/8 examples' in out and 'mrpc validation: 8/8 examples' in out   # progress
    assert (scores['task'], scores['split'], scores['examples']) == ('mrpc', 'validation', 8)
    # a run folder is a prompt (its prompt.npy), and --out saves what was printed
    spot.main(['eval', *common, '--prompt', str(tmp_path), '--eval_limit=8', '--max_input_len=48',
               '--eval_batch_size=8', '--out', str(tmp_path / 'eval.json')])
    saved = json.loads((tmp_path / 'eval.json').read_text())
    assert saved == json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert {k: saved[k] for k in scores if k != 'prompt'} == {k: scores[k] for k in scores if k != 'prompt'}
    assert not (tmp_path / 'run.lock').exists()               # a finished run does not read as running
    # Refused before training. Targets: a number (stsb); the referent's words (wsc).
    for task, folder in (('stsb', 'glue'), ('wsc', 'superglue')):
        with pytest.raises(SystemExit, match="'rank' needs a classification task"):
            spot.main(['train', '--model', 'tiny', '--task', task, '--data', str(shared_data / folder),
                       *common[6:], '--steps', '2', '--out', str(tmp_path / task), '--eval_method=rank',
                       *small])
        assert not (tmp_path / task / 'checkpoint.npz').exists()
    with pytest.raises(SystemExit, match='unknown task'):
        spot.main(['train', *common[:3], 'no_such_task', *common[4:], '--steps', '1',
                   '--out', str(tmp_path / 'x')])
    with pytest.raises(SystemExit, match='d_model'):            # a prompt of the wrong width, from the CLI
        np.save(tmp_path / 'wide.npy', np.zeros((5, 7), np.float32))
        spot.main(['eval', *common, '--prompt', str(tmp_path / 'wide.npy')])


def test_cli_checks_task_flags_data_and_folder_before_reading_vocabulary_or_weights(shared_data, tmp_path,
                                                                                   monkeypatch):
    """A mistyped --task (one line listing tasks and mixtures), a missing --data folder, an --out holding a
    run, and tfds offline fail in one line before a weight is read; --model tiny takes the fetch cache's
    vocabulary, --model DIR its spiece.model: neither asks the hub."""
    import huggingface_hub
    monkeypatch.setattr(spot, 'load_model', lambda *a, **k: pytest.fail('weights loaded'))
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda *a, **k: pytest.fail('asked the hub'))
    monkeypatch.setenv('SPOT_DATA', str(shared_data))
    monkeypatch.delenv('SPOT_VOCAB', raising=False)
    base = ['train', '--model', 'tiny', '--steps', '2', '--batch_size', '4', '--max_input_len', '48']
    (tmp_path / 'done').mkdir()
    (tmp_path / 'done' / 'checkpoint.npz').write_bytes(b'x')

    def refused(*args):
        with pytest.raises(SystemExit) as e:
            spot.main([*base, *args])
        assert '\n' not in str(e.value.code), e.value.code
        return str(e.value.code)
    assert "unknown task 'mrcp' (--task)" in refused('--task', 'mrcp', '--out', str(tmp_path / 'a'))
    assert 'mixtures: GLUE, SuperGLUE' in refused('--task', 'mrcp', '--out', str(tmp_path / 'a'))
    assert '--data nowhere is not a folder' in refused('--task', 'mrpc', '--data', 'nowhere', '--out',
                                                       str(tmp_path / 'a'))
    assert 'continue it with --resume' in refused('--task', 'mrpc', '--data', str(shared_data / 'glue'),
                                                  '--out', str(tmp_path / 'done'))
    if importlib.util.find_spec('tensorflow_datasets'):      # offline tfds: seconds, not minutes
        import socket

        def unreachable(*a, **k):
            raise OSError('Name or service not known')
        monkeypatch.setattr(socket, 'create_connection', unreachable)
        monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
        message = refused('--task', 'mrpc', '--out', str(tmp_path / 'a'))
        assert 'network is unreachable: pass --data DIR' in message and 'data.py fetch glue' in message
    assert not (tmp_path / 'a').exists()
    # the vocabulary: tiny's from the cache, DIR's from DIR/spiece.model (hub patched to fail above)
    assert spot._vocab(argparse.Namespace(model='tiny', vocab=None, dtype='float32')).path == \
        shared_data / 't5_spiece.model'


def test_cli_help_lists_every_config_field_with_default_and_source_and_both_flag_forms(capsys,
                                                                                      monkeypatch):
    with pytest.raises(SystemExit):
        spot.main(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for cls in (spot.TrainConfig, spot.OptimizerConfig, spot.PromptConfig):
        for f in dataclasses.fields(cls):
            if f.name not in ('optimizer', 'init'):       # init: train's own flag
                assert f'--{f.name}' in text and f'{cls.__name__}:' in text, f.name
    assert '--batch_size INT, --batch-size INT TrainConfig: §2.1.4 (default 32)' in text
    assert 'footnote 7; PT runs/prompt_finetune.gin: constant 0.3 (default 0.3)' in text
    assert 'TrainConfig: The run\'s dropout: train_prompt writes it' in text      # comments above the field
    seen = {}
    monkeypatch.setattr(spot, 'plan_cli', lambda args, tc, pc: seen.update(tc=tc, pc=pc))
    spot.main(['plan', '--model', 'tiny', '--batch_size', '8', '--eval-every=7', '--learning-rate', '0.1',
               '--length', '20', '--param_scale=True'])
    assert (seen['tc'].batch_size, seen['tc'].eval_every, seen['pc'].length) == (8, 7, 20)
    assert seen['tc'].optimizer.learning_rate == 0.1 and seen['tc'].optimizer.param_scale is True
    with pytest.raises(SystemExit):
        spot.main(['plan', '--model', 'tiny', '--batch_size', 'eight'])
    assert 'TrainConfig.batch_size expects int' in capsys.readouterr().err


def test_a_vocabulary_larger_than_the_embedding_is_refused(shared_data, tmp_path):
    """T5's 32,100 pieces against a model embedding 64 ids: eval printed a score and train stopped blaming the
    learning rate (the gather clamps ids past the table). Now both stop in one line naming the vocabulary,
    the model and the fix; experiments/common.load_task checks the pair from config.json alone."""
    d, vocab = hf_checkpoint(tmp_path / 'small', 't5_1_1'), shared_data / 't5_spiece.model'
    np.save(tmp_path / 'prompt.npy', np.zeros((4, TINY_HF['d_model']), np.float32))
    args = ['--model', str(d), '--task', 'sst2', '--data', str(shared_data / 'glue'), '--vocab', str(vocab)]
    match = (rf"^error: vocabulary {re.escape(str(vocab))} has 32100 pieces but model {re.escape(str(d))} "
             r"embeds only 64 ids: pass the vocabulary the model was trained with \(--vocab\)")
    for argv in (['eval', *args, '--prompt', str(tmp_path / 'prompt.npy')],
                 ['train', *args, '--out', str(tmp_path / 'run'), '--steps', '2', '--vocab_pool=64']):
        with pytest.raises(SystemExit, match=match):
            spot.main(argv)
    from experiments import common
    (Path(d) / 'spiece.model').symlink_to(vocab)            # the vocabulary beside the model, as on the hub
    with pytest.raises(ValueError, match=match.removeprefix('^error: ').replace(re.escape(str(vocab)), '.*')):
        common.load_task('rte', argparse.Namespace(model=str(d), tiny=False, data=None), spot.TrainConfig())


# ---------------------------------------------------------------------------------------- real, bucketed data
def test_padding_is_invisible_to_logits_loss_and_prompt_gradient(frozen):
    """One batch padded to two bucket lengths: eval-mode logits, loss and prompt gradient agree to float32
    rounding (eps times the longest reduction, P + 64 encoder positions, relative to each value's scale)."""
    import data
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(10, 5000, n)) + [t5_model.EOS_ID] for n in (5, 11, 3, 13)]
    targets = np.tile(np.int32([42, 43, t5_model.EOS_ID]), (4, 1))
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    short, long = (data.pad_rows(rows, n) for n in (data.bucket_length(14, 512), 64))
    assert short.shape[1] == 14

    def outputs(inputs):
        batch = {'inputs': jnp.asarray(inputs), 'targets': jnp.asarray(targets)}
        decoder_inputs = t5_model.shift_right(batch['targets'])
        logits = t5_model.forward(frozen, CFG, batch['inputs'], decoder_inputs, prompt=prompt)
        loss, grad = jax.value_and_grad(spot.prompt_loss)(prompt, frozen, batch, CFG)
        return np.asarray(logits), np.asarray(loss), np.asarray(grad)
    for a, b in zip(outputs(short), outputs(long)):
        tol = np.finfo(np.float32).eps * (P + 64) * np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    wrong = outputs(np.where(long == 0, 5, long))[0]          # the same rows, pad replaced by a real token
    assert np.abs(wrong - outputs(long)[0]).max() > 1e3 * np.finfo(np.float32).eps * np.abs(wrong).max()


@pytest.mark.parametrize('mixture', [False, True])
def test_resume_is_bit_exact_when_batches_change_bucket(tmp_path, frozen, shared_data, mixture):
    """Real data through data.TextSource: batches of different widths; a crash and a resume equal one run."""
    import data
    vocab = data.load_vocab(shared_data / 't5_spiece.model')
    sources = {t: data.TextSource(data.load_pairs(t, 'train', shared_data / 'glue', train=True), vocab, 24, 8)
               for t in ('rte', 'cola')}

    def batches(crash_at=None):
        def make(start):
            if mixture:
                it = data.mixture_batches(sources, B, 1, start)
            else:
                it = data.batches(sources['cola'], B, 1, start)
            for k, b in zip(itertools.count(start), it):
                if k == crash_at:
                    raise RuntimeError('preempted')
                yield b
        return make
    widths = {b['inputs'].shape[1] for _, b in zip(range(TC.steps), batches()(0))}
    assert len(widths) >= 2, widths                             # the premise: the run changes bucket
    full = run(tmp_path / 'full', frozen, batches())
    with pytest.raises(RuntimeError, match='preempted'):
        run(tmp_path / 'cut', frozen, batches(crash_at=10))
    resumed = run(tmp_path / 'cut', frozen, batches(), resume=True)
    assert resumed['losses'] == full['losses'][8:]
    assert leaves_bytes(resumed['prompt']) == leaves_bytes(full['prompt'])
    assert leaves_bytes(resumed['opt_state']) == leaves_bytes(full['opt_state'])


def test_cli_resume_with_other_data_is_refused(shared_data, tmp_path):
    """The run records what it reads (data folder, a fingerprint of the file, the vocabulary): --resume on
    other data would silently continue on it."""
    lines = (shared_data / 'glue' / 'RTE' / 'train.tsv').read_text(encoding='utf-8').splitlines(keepends=True)
    for name, n in (('a', 300), ('b', 150)):
        (tmp_path / name / 'RTE').mkdir(parents=True)
        (tmp_path / name / 'RTE' / 'train.tsv').write_text(''.join(lines[:n]), encoding='utf-8')
        (tmp_path / name / 'RTE' / 'dev.tsv').write_text(''.join(lines[:20]), encoding='utf-8')
    args = ['train', '--model', 'tiny', '--task', 'rte', '--vocab', str(shared_data / 't5_spiece.model'),
            '--batch_size=4', '--eval_every=2', '--eval_limit=4', '--eval_batch_size=4', '--max_input_len=24',
            '--length=5', '--out', str(tmp_path / 'run')]
    spot.main([*args, '--data', str(tmp_path / 'a'), '--steps', '2'])
    with pytest.raises(SystemExit, match=r"other settings.*meta\.reads"):
        spot.main([*args, '--data', str(tmp_path / 'b'), '--steps', '4', '--resume'])
    import shutil
    shutil.copytree(tmp_path / 'a', tmp_path / 'c')
    # the same files elsewhere: fine
    spot.main([*args, '--data', str(tmp_path / 'c'), '--steps', '4', '--resume'])


def test_cli_trains_on_a_mixture_name(shared_data, tmp_path, monkeypatch, capsys):
    """--task accepts a name of data.MIXTURES (SPoT's sources are mixtures): examples-proportional batches, no
    single validation metric, so prompt.npy is the last prompt. (The real mixtures need files ../shared/data
    lacks.)"""
    import data
    monkeypatch.setitem(data.MIXTURES, 'SmallGLUE', ('rte', 'cola'))
    spot.main(['train', '--model', 'tiny', '--task', 'smallglue', '--data', str(shared_data / 'glue'),
               '--vocab', str(shared_data / 't5_spiece.model'), '--steps', '2', '--batch_size=4',
               '--max_input_len=24', '--length=5', '--out', str(tmp_path)])
    assert 'no validation metric' in capsys.readouterr().out
    info = json.loads((tmp_path / 'prompt.json').read_text())
    assert info['task'] == 'smallglue' and info['step'] == 2
    assert set(info['reads']['files']) == {'rte', 'cola'}


def test_cli_says_when_no_score_is_finite_and_warns_of_a_huge_learning_rate(shared_data, tmp_path,
                                                                            monkeypatch, capsys):
    """Regressions: evaluations that all scored NaN printed 'best score -inf'; --learning_rate=1e30 passed
    without a word."""
    monkeypatch.setattr(spot, 'make_evaluator', lambda *a, **k: lambda prompt: {'score': float('nan')})
    common = ['train', '--model', 'tiny', '--task', 'sst2', '--data', str(shared_data / 'glue'),
              '--vocab', str(shared_data / 't5_spiece.model'), '--batch_size=2', '--length=4',
              '--max_input_len=16']
    spot.main([*common, '--steps', '2', '--eval_every=1', '--out', str(tmp_path / 'nan')])
    out = capsys.readouterr().out
    assert f'no evaluation gave a finite score; prompt in {tmp_path}/nan/prompt.npy is the first evaluated ' \
           f'(step 1)' in out and '-inf' not in out, out
    with pytest.raises(SystemExit, match='does not exist'):         # fails before the model loads
        spot.main([*common, '--steps', '2', '--learning_rate=1e30', '--source-prompt',
                   str(tmp_path / 'x.npy'), '--out', str(tmp_path / 'lr')])
    assert "warning: learning_rate=1e+30 is far above prompt tuning's 0.3" in capsys.readouterr().err

class IdVocab:
    """A vocabulary whose text is the ids themselves: '12 7' <-> [12, 7]."""
    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return ' '.join(str(i) for i in ids)


def test_evaluation_groups_by_length_and_returns_predictions_in_order(frozen):
    """Batches of similar lengths padded to their bucket: the same predictions, in input order, as one example
    at a time (each at its own length), for greedy decoding and rank classification."""
    rng = np.random.default_rng(5)   # rows whose ranked answers differ under init_params' weights
    rows = [list(rng.integers(10, 5000, n)) + [t5_model.EOS_ID] for n in (30, 2, 17, 5, 40, 9, 3, 25)]
    prompt = spot.init_prompt(jax.random.key(1), frozen, PC)
    labels = None
    for method in ('decode', 'rank'):
        alone = [spot.evaluate(frozen, CFG, prompt, [r], IdVocab(), method=method, max_target_len=4,
                               batch_size=1, choices=labels and [labels])[0]
                 for r in rows]
        got = spot.evaluate(frozen, CFG, prompt, rows, IdVocab(), method=method, max_target_len=4,
                            batch_size=3, choices=labels and [labels] * len(rows))
        assert len(set(alone)) >= 2, alone                      # the order check means something
        assert got == alone
        labels = tuple(sorted({p.split()[0] for p in alone}))  # greedy first tokens: answers differ


def test_evaluation_pads_a_last_partial_batch_to_a_power_of_two_only(frozen, monkeypatch):
    """Regression: every batch was padded to batch_size, so 10 examples in batches of 8 cost 16 rows. Now the
    last partial batch is padded to the power of two that holds it (2 rows here), in both methods."""
    rows = [[10 + k, t5_model.EOS_ID] for k in range(10)]
    prompt, seen = spot.init_prompt(jax.random.key(1), frozen, PC), []
    for name in ('greedy_decode', 'score_targets'):
        real = getattr(t5_model, name)

        def spy(frozen, cfg, x, *rest, real=real, **kw):
            seen.append(x.shape[0])
            return real(frozen, cfg, x, *rest, **kw)
        monkeypatch.setattr(t5_model, name, spy)
    preds = spot.evaluate(frozen, CFG, prompt, rows, IdVocab(), max_target_len=4, batch_size=8)
    assert seen == [8, 2] and len(preds) == 10
    seen.clear()
    spot.evaluate(frozen, CFG, prompt, rows[:3], IdVocab(), method='rank', choices=[('1', '2')] * 3,
                  max_target_len=4, batch_size=8)
    assert seen == [4, 4]                                    # one call per label, 3 examples in 4 rows

def test_compile_cache_folder_and_off_switch(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv('SPOT_COMPILE_CACHE', 'off')
        assert spot.enable_compile_cache() is None and jax.config.jax_compilation_cache_dir == before
        monkeypatch.setenv('SPOT_COMPILE_CACHE', str(tmp_path / 'a'))
        assert spot.enable_compile_cache() == tmp_path / 'a' == Path(jax.config.jax_compilation_cache_dir)
        monkeypatch.delenv('SPOT_COMPILE_CACHE')
        monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
        assert spot.enable_compile_cache() == tmp_path / 'xdg' / 'spot-jax'
    finally:
        jax.config.update('jax_compilation_cache_dir', before)


# ------------------------------------------------------------------------------------------- the memory plan
def test_memory_plan_takes_the_first_setting_in_order_that_fits():
    """memory_plan at 'auto' returns the first plan_order() setting whose compiled step fits the budget (a
    model whose activations outweigh its weights: 64 tokens, a 64-piece vocabulary)."""
    cfg, tc = t5_model.T5Config.tiny(vocab_size=64), dataclasses.replace(TC, batch_size=8, eval_batch_size=1)
    shapes = jax.eval_shape(lambda k: t5_model.init_params(k, cfg), jax.random.key(0))
    sizes = dict(input_len=64, target_len=8, prompt_len=P)
    order = [(r, m) for r, m in spot.plan_order() if tc.batch_size % m == 0]
    peaks = {(r, m): spot.plan_step(cfg, tc, shapes, r, m, 64, 8, P)['peak'] for r, m in order}
    assert min(peaks.values()) < peaks['none', 1] / 2, peaks          # remat and micro-batches save memory
    assert spot.plan_eval(cfg, tc, shapes, 64, 8, P)['peak'] < min(peaks.values())
    for budget in sorted(set(peaks.values()))[:3]:
        plan = spot.memory_plan(cfg, tc, shapes, **sizes, device_memory_gib=(budget + 1) / 0.75 / spot.GiB)
        first = next(setting for setting in order if peaks[setting] <= plan['budget'])
        assert (plan['remat'], plan['micro_batches']) == first and plan['fits'], (budget, plan, peaks)
        assert plan['step_peak'] == peaks[first] and plan['weights'] > 0 and plan['eval_peak'] > 0
    assert not spot.memory_plan(cfg, tc, shapes, **sizes, device_memory_gib=1e-6)['fits']
    # micro_batches that plan_order() does not list, remat 'auto' (it crashed: no setting to try)
    tc3 = dataclasses.replace(tc, batch_size=6, remat='auto', micro_batches=3)
    three = spot.memory_plan(cfg, tc3, shapes, **sizes, device_memory_gib=1)
    assert (three['remat'], three['micro_batches']) == (spot.plan_order()[0][0], 3) and three['fits']


def test_plan_cli_prints_the_plan_and_train_refuses_what_will_not_fit_before_loading(tmp_path, capsys,
                                                                                     monkeypatch):
    spot.main(['plan', '--model', 'tiny', '--batch_size=8', '--max_input_len=32', '--length=8',
               '--eval_batch_size=8'])
    out = capsys.readouterr().out.strip().splitlines()
    for field in ('weights:', 'prompt + optimizer:', 'activations/temporaries:', 'plans for:', 'remat:',
                  'compile:'):
        assert any(line.startswith(field) for line in out), (field, out)
    assert re.fullmatch(r'peak per device: \d+\.\d\d GiB', out[-1])
    monkeypatch.setattr(spot, 'load_model', lambda *a, **k: pytest.fail('weights loaded before the plan'))
    with pytest.raises(SystemExit, match=r'needs .* GiB per device .* --micro_batches|weights alone'):
        spot.main(['train', '--model', 'google/t5-xxl-lm-adapt', '--task', 'rte', '--dtype', 'bfloat16',
                   '--device-memory', '10', '--out', str(tmp_path / 'x')])
    assert not (tmp_path / 'x').exists()


# ------------------------------------------------------------------------------- many runs, one step (#26)
def widened_batches(seed, width, crash_at=None):
    """synthetic_batches(seed) with inputs padded to `width` columns: runs of other buckets in one group."""
    def batches(start):
        for k, b in zip(itertools.count(start), synthetic_batches(seed, crash_at=crash_at)(start)):
            yield {**b, 'inputs': np.pad(b['inputs'], ((0, 0), (0, width - S)))}
    return batches


# learning rate 1e-3: where a step does not amplify rounding (see the first test below)
SLOW = dataclasses.replace(TC, optimizer=dataclasses.replace(TC.optimizer, learning_rate=1e-3))


def group_runs(out, frozen, crash_at=None, seeds=(0, 1, 2), tc=TC):
    """Runs of 3 seeds, data orders and bucket widths (10, 12, 16), each its own folder out/seed<k>."""
    return [spot.Run(spot.init_prompt(jax.random.key(10 + s), frozen, PC), dataclasses.replace(tc, seed=s),
                     widened_batches(s, S + 2 * s + s * s // 2 * 2, crash_at if s == 1 else None),
                     evaluator(frozen), out / f'seed{s}') for s in seeds]


def run_files(d):
    """(prompt.npy, prompt.json's step and score, checkpoint prompt, metrics.jsonl without timings)."""
    info = json.loads((d / 'prompt.json').read_text())
    events = [{k: v for k, v in json.loads(line).items() if k not in ('steps_per_s', 'time')}
              for line in (d / 'metrics.jsonl').read_text().splitlines()]
    checkpoint = np.load(d / 'checkpoint.npz')['prompt']
    return np.load(d / 'prompt.npy'), (info['step'], info['score']), checkpoint, events


def test_runs_sharing_a_step_end_as_each_alone_and_resume_exactly(tmp_path, frozen):
    """Three runs (own seeds, data, bucket widths) in one vmapped step: each run's prompt.npy, best checkpoint
    and metrics.jsonl equal the same run trained alone, to float32 rounding; a group killed mid-run resumes
    to the bits of the uninterrupted group. Tolerance: every step's gradient carries at most
    network_roundings roundings, compounded over the steps. That bound holds where a step does not amplify
    a difference: at learning rate 1e-3 here. At 0.3 the batched matmuls' 1-ulp gradient difference grows
    about 3x a step on this 16-wide model (Adafactor divides by sqrt(v), the gradient's own running scale),
    as between any two machines: in the loss 1e-6 at step 3, 2e-4 at 6, 0.06 at 12 (measured)."""
    short = SLOW
    alone = spot.train_prompts(group_runs(tmp_path / 'alone', frozen, tc=short), frozen, CFG, log=quiet,
                               runs_per_step=1)
    lines = []
    together = spot.train_prompts(group_runs(tmp_path / 'group', frozen, tc=short), frozen, CFG,
                                  log=lines.append)
    assert sum('compiling' in line for line in lines) == 1, lines    # one step shape for the group
    assert any(re.match(r'compiled, first step done in [\d.]+ s', line) for line in lines), lines
    roundings = short.steps * network_roundings(CFG, P + 16)
    for s, (a, b) in enumerate(zip(alone, together)):
        assert a['best_step'] == b['best_step'] and a['step'] == b['step'] == short.steps
        np.testing.assert_allclose(b['losses'], a['losses'], rtol=0, atol=f32_atol(a['losses'], roundings))
        fa, fb = run_files(tmp_path / 'alone' / f'seed{s}'), run_files(tmp_path / 'group' / f'seed{s}')
        for x, y in ((fa[0], fb[0]), (fa[2], fb[2])):
            np.testing.assert_allclose(y, x, rtol=0, atol=f32_atol(x, roundings))
        assert fa[1][0] == fb[1][0] and [sorted(e) for e in fa[3]] == [sorted(e) for e in fb[3]]
        for ea, eb in zip(fa[3], fb[3]):
            assert ea['step'] == eb['step']
            got, want = (eb.get('loss', eb.get('eval', {}).get('score')),
                         ea.get('loss', ea.get('eval', {}).get('score')))
            assert abs(got - want) <= f32_atol(want, roundings), (ea, eb)
    assert len({float(np.abs(r['prompt']).sum()) for r in together}) == 3   # three different runs
    # killed mid-run: run 1's data fails at step 10, after the step-8 checkpoints of all three
    full = spot.train_prompts(group_runs(tmp_path / 'full', frozen), frozen, CFG, log=quiet)
    with pytest.raises(RuntimeError, match='preempted'):
        spot.train_prompts(group_runs(tmp_path / 'cut', frozen, crash_at=10), frozen, CFG, log=quiet)
    resumed = spot.train_prompts(group_runs(tmp_path / 'cut', frozen), frozen, CFG, log=quiet, resume=True)
    for s, (a, b) in enumerate(zip(full, resumed)):
        assert leaves_bytes(a['prompt']) == leaves_bytes(b['prompt'])
        assert leaves_bytes(a['opt_state']) == leaves_bytes(b['opt_state'])
        assert b['losses'] == a['losses'][8:]
        fa, fb = run_files(tmp_path / 'full' / f'seed{s}'), run_files(tmp_path / 'cut' / f'seed{s}')
        assert fa[0].tobytes() == fb[0].tobytes() and fa[1] == fb[1] and fa[3] == fb[3]


def test_runs_of_other_lengths_leave_the_group_and_a_nan_run_stops_alone(tmp_path, frozen):
    """A run with fewer steps leaves the group (the rest re-form: one more compile) and ends as alone; a run
    whose loss turns NaN is dropped, the others finish, and its FloatingPointError comes at the end."""
    runs = group_runs(tmp_path / 'g', frozen, seeds=(0, 1), tc=SLOW)
    runs[0] = dataclasses.replace(runs[0], tc=dataclasses.replace(SLOW, steps=6))
    runs.append(spot.Run(spot.init_prompt(jax.random.key(3), frozen, PC), SLOW,
                         synthetic_batches(poison_from=5), evaluator(frozen), tmp_path / 'g' / 'poisoned'))
    emb = frozen['token_embedder']['embedding']
    frozen_nan = {**frozen, 'token_embedder': {'embedding': emb.at[POISON].set(jnp.nan)}}
    with pytest.raises(FloatingPointError, match='loss is nan at step 6'):
        spot.train_prompts(runs, frozen_nan, CFG, log=quiet)
    spot.train_prompt(runs[0].prompt, frozen_nan, CFG, runs[0].tc, runs[0].batches, runs[0].evaluator,
                      tmp_path / 'short', log=quiet)
    a, b = run_files(tmp_path / 'short'), run_files(tmp_path / 'g' / 'seed0')
    np.testing.assert_allclose(b[0], a[0], rtol=0, atol=f32_atol(a[0], 6 * network_roundings(CFG, P + 16)))
    _, _, state = spot.load_checkpoint(tmp_path / 'g' / 'seed1' / 'checkpoint.npz',
                                       spot.make_optimizer(TC.optimizer))
    assert state['step'] == TC.steps                                 # the long run finished
    _, _, state = spot.load_checkpoint(tmp_path / 'g' / 'poisoned' / 'checkpoint.npz',
                                       spot.make_optimizer(TC.optimizer))
    assert state['step'] == 4                                        # the NaN run kept its last good one


def test_mixed_prompt_evaluation_predicts_as_one_prompt_at_a_time(frozen):
    """evaluate with a stack of prompts and a prompt per example (tasks with other label sets and target
    lengths in one batch): the predictions of each prompt alone, for decoding and rank classification."""
    rng = np.random.default_rng(5)
    rows = [list(rng.integers(10, 5000, n)) + [t5_model.EOS_ID] for n in (30, 2, 17, 5, 40, 9, 3, 25, 11)]
    prompts = jnp.stack([spot.init_prompt(jax.random.key(k), frozen, PC) for k in (1, 2, 3)])
    ids = np.arange(len(rows)) % 3
    lens = [4, 3, 5]
    for method in ('decode', 'rank'):
        labels = [('12 7', '300', '41 42 43'), ('9', '10'), ('77 1', '5', '6', '8')] if method == 'rank' \
            else None
        alone = [spot.evaluate(frozen, CFG, prompts[k], [r], IdVocab(), method=method, max_target_len=lens[k],
                               batch_size=1, choices=labels and [labels[k]])[0]
                 for r, k in zip(rows, ids)]
        assert len(set(alone)) >= 3, alone
        mixed = spot.evaluate(frozen, CFG, prompts, rows, IdVocab(), method=method, max_target_len=lens,
                              batch_size=4, choices=labels and [labels[k] for k in ids], prompt_ids=ids)
        assert mixed == alone


def test_cli_seeds_train_each_seed_as_alone_and_resume_after_sigkill(shared_data, tmp_path, capsys):
    """`spot.py train --seeds 0,1` writes OUT/seed<k>, each as `--seed=<k> --out X` (to float32 rounding, at a
    learning rate where steps do not amplify it: test_runs_sharing_a_step_end_as_each_alone...); killed with
    SIGKILL mid-run, --resume ends with the bits of an uninterrupted `--seeds` run."""
    common = ['--model', 'tiny', '--task', 'cb', '--data', str(shared_data / 'superglue'),
              '--vocab', str(shared_data / 't5_spiece.model'), '--batch_size=2', '--length=4',
              '--max_input_len=32', '--eval_limit=4', '--eval_batch_size=4', '--eval_method=rank']
    short = [*common, '--steps', '4', '--eval_every=2', '--learning_rate=0.001']
    spot.main(['train', *short, '--seeds', '0,1', '--out', str(tmp_path / 'many')])
    spot.main(['train', *short, '--seed=1', '--out', str(tmp_path / 'one')])
    out = capsys.readouterr().out
    assert out.count('best score') == 3 and 'many/seed0/prompt.npy' in out
    a, b = run_files(tmp_path / 'one'), run_files(tmp_path / 'many' / 'seed1')
    tol = f32_atol(a[0], 4 * network_roundings(t5_model.T5Config.tiny(), 4 + 32))
    np.testing.assert_allclose(b[0], a[0], rtol=0, atol=tol)
    assert a[1][0] == b[1][0] and [(e['step'], sorted(e)) for e in a[3]] == [(e['step'], sorted(e))
                                                                              for e in b[3]]
    assert not np.allclose(run_files(tmp_path / 'many' / 'seed0')[0], b[0])
    cmd = [sys.executable, 'spot.py', 'train', *common, '--seeds', '0,1', '--steps', '400',
           '--eval_every=1000000', '--checkpoint_every=4', '--log_every=4']
    child = subprocess.Popen([*cmd, '--out', str(tmp_path / 'cut')], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for line in child.stdout:                                  # after the step-8 checkpoints
        if line.startswith('step 8/'):
            break
    child.kill()
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    cmd[cmd.index('400')] = '12'
    subprocess.run([*cmd, '--out', str(tmp_path / 'cut'), '--resume'], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run([*cmd, '--out', str(tmp_path / 'full')], cwd=ROOT, check=True, capture_output=True)
    for seed in ('seed0', 'seed1'):
        for name in ('prompt.npy', 'checkpoint.npz'):
            x, y = (np.load(tmp_path / d / seed / name) for d in ('full', 'cut'))
            for k in (x.files if name.endswith('.npz') else [None]):
                if k != 'state':
                    assert (x[k] if k else x).tobytes() == (y[k] if k else y).tobytes(), (seed, name, k)


def test_runs_log_compiles_the_first_step_and_every_30_s_with_wall_time_in_metrics(tmp_path, frozen,
                                                                                  monkeypatch):
    """Progress lines: a compile (and its time), after the first step, and at least every 30 s of wall time
    whatever log_every says; every metrics.jsonl event carries its wall-clock time."""
    clock = itertools.count(0.0, 11.0)                       # each reading of the clock: 11 s later
    monkeypatch.setattr(spot.time, 'perf_counter', lambda: next(clock))
    lines, start = [], time.time()
    tc = dataclasses.replace(TC, steps=8, log_every=1000)
    spot.train_prompt(spot.init_prompt(jax.random.key(1), frozen, PC), frozen, CFG, tc, synthetic_batches(),
                      evaluator(frozen), tmp_path, log=lines.append)
    assert 'compiling' in lines[0] and re.match(r'(compiled|found compiled), first step done in', lines[1])
    steps = [int(m.group(1)) for m in (re.match(r'step (\d+)/8  loss', x) for x in lines) if m]
    assert len(steps) >= 3 and steps[-1] == 8, lines      # log_every 1000: only the 30 s lines and the end
    events = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert events and all(start <= e['time'] <= time.time() for e in events), events


def test_cli_seeds_take_as_many_runs_per_step_as_the_memory_plan_fits(shared_data, tmp_path, monkeypatch,
                                                                       capsys):
    """Without --runs-per-step, R halves until the plan of R runs' batches fits (here: up to 2 x 4 rows)."""
    real, got = spot._plan_or_refuse, {}

    def plan(args, tc, pc, mesh, plan_anyway=False):
        if tc.batch_size > 2 * 4:
            raise MemoryError(f'{tc.batch_size} rows do not fit')
        return real(args, tc, pc, mesh, plan_anyway)
    monkeypatch.setattr(spot, '_plan_or_refuse', plan)
    monkeypatch.setattr(spot, 'train_prompts', lambda runs, *a, runs_per_step, **k: got.update(
        R=runs_per_step, n=len(runs), batch=runs[0].tc.batch_size) or [])
    spot.main(['train', '--model', 'tiny', '--task', 'cb', '--data', str(shared_data / 'superglue'),
               '--vocab', str(shared_data / 't5_spiece.model'), '--batch_size=4', '--seeds', '0,1,2,3,4',
               '--steps', '1', '--out', str(tmp_path)])
    assert got == {'R': 2, 'n': 5, 'batch': 4}
    out = capsys.readouterr().out
    assert '5 runs per step do not fit (20 rows do not fit): trying 2' in out
    with pytest.raises(SystemExit, match='12 rows do not fit'):    # --runs-per-step given: refused as is
        spot.main(['train', '--model', 'tiny', '--task', 'cb', '--data', str(shared_data / 'superglue'),
                   '--vocab', str(shared_data / 't5_spiece.model'), '--batch_size=4', '--seeds', '0,1,2',
                   '--runs-per-step', '3', '--steps', '1', '--out', str(tmp_path / 'x')])


def test_cli_several_tasks_and_source_prompts_each_get_a_folder(shared_data, tmp_path, monkeypatch):
    """--task A B --source-prompt X Y --seeds 0,1: one run per (task, source, seed) in OUT/<task>/<source
    name>/seed<k>, each from its own source prompt and with its task's evaluator (shared by its runs)."""
    got = []
    monkeypatch.setattr(spot, 'train_prompts', lambda runs, *a, **k: got.extend(runs) or [])
    width = t5_model.T5Config.tiny().d_model
    for name, value in (('a', 1.0), ('b', 2.0)):
        np.save(tmp_path / f'{name}.npy', np.full((4, width), value, np.float32))
    spot.main(['train', '--model', 'tiny', '--task', 'cb', 'copa', '--data', str(shared_data / 'superglue'),
               '--vocab', str(shared_data / 't5_spiece.model'), '--batch_size=4', '--length=4',
               '--seeds', '0,1', '--source-prompt', str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy'),
               '--steps', '1', '--out', str(tmp_path / 'out')])
    assert [str(r.out_dir.relative_to(tmp_path / 'out')) for r in got] == [
        f'{t}/{s}/seed{k}' for t in ('cb', 'copa') for s in 'ab' for k in (0, 1)]
    assert [float(np.asarray(r.prompt)[0, 0]) for r in got] == [1.0, 1.0, 2.0, 2.0] * 2
    assert [r.tc.seed for r in got] == [0, 1] * 4
    assert [r.meta['task'] for r in got] == ['cb'] * 4 + ['copa'] * 4
    assert got[0].evaluator is got[3].evaluator and got[0].evaluator is not got[4].evaluator
