"""Benchmark (not a test): the prompt-tuning step and greedy evaluation at the paper's sizes, one shot.

For each model size (default Base, XL, XXL in bfloat16 on an accelerator; Small and Base in float32 on a
CPU-only machine), batch 32, 100 prompt positions, 8 target tokens, and the input lengths SuperGLUE batches
are padded to (data.bucket_length over its validation sets: SUPERGLUE_BUCKETS) plus 512: step time,
greedy-eval time, tokens/s, FLOPs by arithmetic (step_flops), MFU against the device's bf16 dense peak
(PEAK_TFLOPS), the step's FLOP/s against a large matmul measured here in the same dtype, compile time per
shape, the plan's peak (XLA's buffer assignment of the compiled step and evaluation, counted as
spot.plan_step counts it) beside the measured one (memory_stats() peak_bytes_in_use; none on CPU), and the
host's time per step (batch preparation + dispatch) against the step. remat and micro_batches come from
spot.resolve_memory at the longest length, as `spot.py train` decides them; a size whose plan does not fit
the device is skipped. Prints one table; writes --out (default results/bench_accelerator.json; --tiny:
results/bench_accelerator_tiny.json).

    python3 experiments/bench_accelerator.py          # accelerator: --time-budget 420 s + process starts
    python3 experiments/bench_accelerator.py          # CPU: Small and Base at the shortest length, ~3 min
    python3 experiments/bench_accelerator.py --tiny   # random tiny T5, about 30 s (tests)

Each size runs in its own process: the allocator's peak cannot be reset, and an out-of-memory size must not
end the run. --time-budget (default 420 s) is shared among the sizes; a size out of time skips its shorter
lengths, never the longest. XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) is the share of the card JAX takes
and plans for. Random weights: greedy decoding runs all 8 steps (no row emits EOS), the worst case.
"""
import argparse
import collections
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: repo root

import data
import spot
import t5_model

SIZES = {'tiny': 'tiny', **{s: f'google/t5-{s}-lm-adapt' for s in ('small', 'base', 'large', 'xl', 'xxl')}}
P, T, B = 100, 8, 32              # SPoT §2.1: prompt length 100; classification targets 8; §2.1.4: batch 32
OUT = ROOT / 'results' / 'bench_accelerator.json'
TINY_OUT = ROOT / 'results' / 'bench_accelerator_tiny.json'
# bf16 dense TFLOP/s (without sparsity) by device_kind substring, first match wins. NVIDIA H100 and H200
# datasheets (nvidia.com/en-us/data-center/h100/, /h200/): "BFLOAT16 Tensor Core 1,979 teraFLOPS" (SXM) with
# sparsity, half of it dense; H100 PCIe 1,513 / 2; A100 datasheet 312. Google Cloud TPU docs (system
# architecture pages): v4 275, v5e 197, v5p 459, v6e 918.
PEAK_TFLOPS = (('H100 PCIe', 756.5), ('H100 NVL', 835.5), ('H100', 989.5), ('H200', 989.5), ('A100', 312.0),
               ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0),
               ('TPU v6', 918.0))
# Input lengths of SuperGLUE batches of 32: per task, the median of data.bucket_length(longest input, 512)
# over batches data.batch_rows(n, 32, seed 0, k) of its validation inputs (T5 vocabulary, 512 cap), with the
# batches seen. ReCoRD is not among the fetched files (`python3 data.py fetch`). On a machine with the files
# the script computes them again and says whether they differ; regenerate this table with
#     python3 experiments/bench_accelerator.py --print-buckets [--data DIR]
SUPERGLUE_BUCKETS = {
    'boolq': (384, {256: 3, 320: 32, 384: 29, 448: 14, 512: 24}),
    'cb': (320, {320: 1}),
    'copa': (56, {48: 1, 56: 2}),
    'multirc': (512, {512: 151}),
    'superglue_rte': (256, {192: 3, 224: 1, 256: 3, 320: 1}),
    'wic': (56, {48: 7, 56: 9, 64: 2, 80: 1}),
    'wsc': (96, {96: 3}),
}


# ------------------------------------------------------------------------------------ the lengths to run
def superglue_buckets(data_dir, batch_size=B):
    """SUPERGLUE_BUCKETS computed from the validation files under data_dir (t5_spiece.model, superglue/)."""
    vocab, out = data.load_vocab(str(Path(data_dir) / 't5_spiece.model')), {}
    for task in data.MIXTURES['SuperGLUE']:
        try:
            pairs = data.load_pairs(task, 'validation', data_dir)
        except FileNotFoundError:
            continue
        source = data.TextSource(pairs, vocab, data.MAX_INPUT_LEN, T)
        lengths = np.array([len(x) for x in source.rows(np.arange(len(source)))[0]])
        batches = [data.batch_rows(len(source), batch_size, 0, k)
                   for k in range(max(1, len(source) // batch_size))]
        seen = sorted(data.bucket_length(lengths[rows].max(), data.MAX_INPUT_LEN) for rows in batches)
        out[task] = (seen[len(seen) // 2], dict(sorted(collections.Counter(seen).items())))
    return out


def input_lengths(args):
    """(lengths, where they came from): --lengths, or the tasks' median buckets and 512."""
    if args.lengths:
        return sorted({int(n) for n in args.lengths.split(',')}), '--lengths'
    buckets, source = SUPERGLUE_BUCKETS, 'SUPERGLUE_BUCKETS (the table in this script)'
    if (Path(args.data) / 'superglue').is_dir() and (Path(args.data) / 't5_spiece.model').is_file():
        buckets, source = superglue_buckets(args.data), f'the validation files in {args.data}'
        if buckets != SUPERGLUE_BUCKETS:
            source += ' (they differ from SUPERGLUE_BUCKETS: regenerate it, --print-buckets)'
    return sorted({median for median, _ in buckets.values()} | {data.MAX_INPUT_LEN}), source


# ------------------------------------------------------------------------------------------- FLOPs
# By arithmetic: cost_analysis() counts a lax.scan body (one layer) once, not once per layer. 2 FLOPs per
# multiply-add of the formulas t5_model runs (cross-attention without keys and values where
# t5_model._absorbs_cross says so); norms, softmax, dropout and the optimizer are not counted. Checked against
# XLA's count of one scanned layer (tests/test_bench_accelerator.py): within 1-3%.
def forward_flops(cfg, S, T, P):
    """One example's forward FLOPs by kind. Matmuls against frozen weights: 'weights' (2-D, kept by remat
    'dots'), 'last' (the MLP's wo, whose output the backward pass does not need), 'scores_w' and 'values_w'
    (absorbed cross-attention: q W_k^T and (probs E) W_v, with a batch axis); activations x activations:
    'scores' (q k^T) and 'values' (probs v); 'logits' (after the layers)."""
    D, N, H, F, V = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
    E, Le, Ld, NH = P + S, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads * cfg.d_kv
    wi = 2 if cfg.gated_gelu else 1             # gated GELU: wi_0 and wi_1; T5 1.0: wi
    # per layer: q k v out (decoder: + cross-attention q out) and the MLP's input matmuls
    f = {'weights': Le * 2 * E * D * (4 * NH + wi * F) + Ld * 2 * T * D * (6 * NH + wi * F),
         'last': Le * 2 * E * F * D + Ld * 2 * T * F * D, 'logits': 2 * T * D * V,
         'scores': Le * 2 * N * E * E * H + Ld * 2 * N * T * T * H}
    f['values'] = f['scores']
    if t5_model._absorbs_cross(cfg, E, T):       # (q W_k^T) E^T, probs E, then W_v
        f.update(scores_w=Ld * 2 * N * T * H * D, values_w=Ld * 2 * N * T * D * H)
        f['scores'] += Ld * 2 * N * T * E * D
        f['values'] += Ld * 2 * N * T * E * D
    else:                                        # keys and values of E positions, then attention
        f.update(scores_w=0, values_w=0)
        f['weights'] += Ld * 2 * 2 * E * D * NH
        f['scores'] += Ld * 2 * N * T * E * H
        f['values'] += Ld * 2 * N * T * E * H
    return f


def step_flops(cfg, batch, S, T, P, remat):
    """FLOPs of one training step: 'forward'; 'backward' with respect to activations only (no weight
    gradient is built: one matmul per matmul against a weight, two per activations x activations); 'remat',
    what the backward pass recomputes of the forward it needs: 'layer' all of a layer but the MLP's last
    matmul, 'dots' (dots_with_no_batch_dims_saveable keeps the 2-D matmuls) the attention scores."""
    f = forward_flops(cfg, S, T, P)
    weights = f['weights'] + f['last'] + f['scores_w'] + f['values_w'] + f['logits']
    acts = f['scores'] + f['values']
    recompute = {'none': 0, 'dots': f['scores'] + f['scores_w'],
                 'layer': weights + acts - f['last'] - f['logits']}[remat]
    return {'forward': batch * (weights + acts), 'backward': batch * (weights + 2 * acts),
            'remat': batch * recompute}


def eval_flops(cfg, batch, S, T, P, steps):
    """FLOPs of t5_model.greedy_decode: the encoder once, then `steps` decoder steps of one token, whose
    self-attention reads all T cache slots; cross-attention keys/values once, or absorbed per step."""
    D, N, H, F, V = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
    E, Le, Ld, NH = P + S, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads * cfg.d_kv
    encoder = Le * (4 * 2 * E * D * NH + 2 * E * D * F * (3 if cfg.gated_gelu else 2) + 2 * 2 * N * E * E * H)
    token = Ld * (6 * 2 * D * NH + 2 * D * F * (3 if cfg.gated_gelu else 2) + 2 * 2 * N * T * H) + 2 * D * V
    if t5_model._absorbs_cross(cfg, E, T):
        token, cross = token + Ld * (2 * 2 * N * H * D + 2 * 2 * N * E * D), 0
    else:
        token, cross = token + Ld * 2 * 2 * N * E * H, Ld * 2 * 2 * E * D * NH
    return batch * (encoder + cross + steps * token)


# ----------------------------------------------------------------------------------- one size, one process
def matmul_flops_per_s(dtype, n, reps=5):
    """FLOP/s of n x n x n matmuls in dtype on the default device (median of reps timed calls of 4)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a @ a @ a @ a)
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 4 * 2 * n ** 3 / statistics.median(ts)


def device_params(cfg, dtype, seed=0):
    """init_params' leaves at its scales (t5_model._param_specs), each drawn on its own, in one jit:
    init_params draws them all as one float32 array (XLA:CPU plans 178 GB of temporaries for XXL in bf16)."""
    specs = t5_model._param_specs(cfg)

    def draw(key):
        return t5_model._unflatten({path: jnp.ones(shape, dtype) if std is None else
                                    (std * jax.random.normal(k, shape, dtype)).astype(dtype)
                                    for k, (path, (shape, std)) in zip(jax.random.split(key, len(specs)),
                                                                       specs.items())})
    return jax.jit(draw)(jax.random.key(seed))


def token_arrays(vocab_size, S, n, seed=0):
    """n inputs whose lengths are drawn from the lengths data.bucket_length pads to S, and n targets of 2-8
    tokens: data.batches over them makes batches of S x T (unpad, bucket, pad, as for any source)."""
    rng, lo = np.random.default_rng(seed), min(k for k in range(1, S + 1) if data.bucket_length(k, S) == S)
    out = {}
    for name, width, low in (('inputs', S, lo), ('targets', T, 2)):
        ids = rng.integers(2, vocab_size, (n, width)).astype(np.int32)
        lengths = rng.integers(low, width + 1, n)
        ids[np.arange(width)[None, :] >= lengths[:, None]] = t5_model.PAD_ID
        ids[np.arange(n), lengths - 1] = t5_model.EOS_ID
        out[name] = ids
    return data.ArraySource(**out)


def compiled(fn, *args, **kwargs):
    """(compiled program, lower seconds, compile seconds) of a jitted function on these arguments. Calls of fn
    with arguments of the same shapes then run this program (jit's in-memory cache) without compiling."""
    t = time.perf_counter()
    lowered = fn.lower(*args, **kwargs)
    t1 = time.perf_counter()
    program = lowered.compile()
    return program, t1 - t, time.perf_counter() - t1


def planned_bytes(program):
    """The memory plan's peak of a compiled program, as spot.plan_step counts it: arguments + outputs -
    donated (aliased) + temporaries (XLA's buffer assignment). On CPU in bfloat16 it includes XLA:CPU's
    float32 copies of the weights, which spot's plan leaves out (spot._compiled_bytes)."""
    m = program.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def peak_bytes():
    """The allocator's high-water mark (it only grows); None on CPU."""
    return (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')


class IdsVocab:
    """spot.evaluate's vocabulary here: a prediction is its token ids, so it counts its decoding steps."""
    def decode(self, ids):
        return ' '.join(map(str, ids))


COMPILES = []       # backend compiles in this process (run_size listens): one inside a timed loop is reported


def count_compiles(event, seconds, **_):
    if event.endswith('backend_compile_duration'):
        COMPILES.append(seconds)


def bench_shape(cfg, tc, frozen, S, steps, eval_batch):
    """One input length: compile the step and greedy decoding (timed), then time them."""
    row, gib = {'S': S, 'positions': P + S, 'batch': tc.batch_size}, lambda x: x / spot.GiB
    step_cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout, remat=tc.remat)
    static = (step_cfg, tc.optimizer, tc.z_loss, spot.sub_batch_count(tc), tc.micro_batches)
    prompt = spot.init_prompt(jax.random.key(1), frozen, spot.PromptConfig(length=P))
    opt_state = spot.make_optimizer(tc.optimizer).init(prompt)
    source = token_arrays(cfg.vocab_size, S, 4 * tc.batch_size)
    batches = data.batches(source, tc.batch_size, seed=0)
    first, rows = next(batches), jnp.asarray(np.resize(source.inputs, (eval_batch, S)))
    step_program, lower_s, compile_s = compiled(spot.train_step, prompt, opt_state, frozen, first,
                                                spot.dropout_key(0, 0), *static)
    eval_program, eval_lower_s, eval_compile_s = compiled(t5_model.greedy_decode, frozen, cfg, rows, prompt,
                                                          max_len=T)
    row.update(step_lower_s=lower_s, step_compile_s=compile_s, eval_lower_s=eval_lower_s,
               eval_compile_s=eval_compile_s, plan_step_gib=gib(planned_bytes(step_program)),
               plan_eval_gib=gib(planned_bytes(eval_program)))
    del step_program, eval_program

    def step(prompt, opt_state, batch, k):
        return spot.train_step(prompt, opt_state, frozen, batch, spot.dropout_key(0, k), *static)
    t = time.perf_counter()                           # the first call: dispatch, one step
    prompt, opt_state, loss = step(prompt, opt_state, first, 0)
    float(loss)
    row['first_step_s'], k, compiles = time.perf_counter() - t, 1, len(COMPILES)
    # The device's step: batches already on it, steps dispatched back to back, one sync at the end.
    ready = [jax.device_put(next(batches)) for _ in range(steps)]
    t = time.perf_counter()
    for b in ready:
        prompt, opt_state, loss = step(prompt, opt_state, b, k)
        k += 1
    float(loss)
    row['step_s'] = (time.perf_counter() - t) / steps
    # As spot.train_prompt runs it: make the batch, dispatch the step, sync on the loss (its NaN check).
    prep, dispatch, loop = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(batches)
        t1 = time.perf_counter()
        prompt, opt_state, loss = step(prompt, opt_state, b, k)
        t2 = time.perf_counter()
        float(loss)
        prep.append(t1 - t0), dispatch.append(t2 - t1), loop.append(time.perf_counter() - t0)
        k += 1
    row.update(batch_prep_s=statistics.median(prep), dispatch_s=statistics.median(dispatch),
               loop_step_s=statistics.median(loop))
    row['host_s'] = row['batch_prep_s'] + row['dispatch_s']
    row['tokens_per_s'] = tc.batch_size * (P + S + T) / row['step_s']
    row.update({f'{part}_flops': n for part, n in step_flops(cfg, tc.batch_size, S, T, P, tc.remat).items()})

    # spot.evaluate, as training runs it, on one batch. The rows keep their padding: the batch is S wide, the
    # compiled shape.
    times, eval_rows = [], np.asarray(rows).tolist()
    for _ in range(steps + 1):                        # the first call is left out
        t = time.perf_counter()
        out = spot.evaluate(frozen, cfg, prompt, eval_rows, IdsVocab(), max_target_len=T,
                            batch_size=eval_batch)
        times.append(time.perf_counter() - t)
    decoded = min(T, max(len(p.split()) for p in out) + 1)
    row.update(eval_s=statistics.median(times[1:]), eval_batch=eval_batch, eval_steps=decoded,
               eval_flops=eval_flops(cfg, eval_batch, S, T, P, decoded),
               compiles_while_timed=len(COMPILES) - compiles)
    row['measured_gib'] = peak_bytes() and gib(peak_bytes())
    return row


def run_size(spec):
    """The child process of one size: the memory plan, weights, then each input length, shortest first so
    that the allocator's peak, which only grows, is each length's own. Writes spec['out'] after each step."""
    size, t_start, dtype = spec['size'], time.perf_counter(), spot.DTYPES[spec['dtype']]
    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    result = {'size': size, 'rows': [], 'device': spot.device_summary(), 'backend': jax.default_backend(),
              'device_kind': jax.devices()[0].device_kind}

    def save():
        result['host_rss_peak_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / spot.GiB
        result['seconds'] = time.perf_counter() - t_start
        # the matmul before and after the lengths: the better one (other processes may share the device)
        result['matmul_flops_per_s'] = max(matmuls)
        Path(spec['out']).write_text(json.dumps(result, indent=1))
    n = 512 if size == 'tiny' else 2048 if result['backend'] == 'cpu' else 8192
    matmuls = [matmul_flops_per_s(dtype, n)]
    cfg = t5_model.T5Config.tiny() if size == 'tiny' else t5_model.T5Config.from_name(SIZES[size])
    tc = spot.TrainConfig(batch_size=spec['batch'], eval_batch_size=spec['eval_batch'], remat=spec['remat'],
                          micro_batches=spec['micro_batches'])
    shapes, lengths = jax.eval_shape(lambda k: t5_model.init_params(k, cfg, dtype), jax.random.key(0)), \
        spec['lengths']
    # remat and micro-batches for the longest length, as spot.py train decides them (from shapes)
    t = time.perf_counter()
    tc, plan = spot.resolve_memory(cfg, tc, shapes, max(lengths), T, P, None, spec['device_memory'], print)
    result['plan'] = {'seconds': time.perf_counter() - t, 'remat': tc.remat,
                      'micro_batches': tc.micro_batches,
                      'budget_gib': spot.memory_budget(spec['device_memory'])[0] / spot.GiB}
    if plan is not None:
        result['plan'].update({k: plan[k] / spot.GiB for k in ('peak', 'step_peak', 'eval_peak', 'weights',
                                                               'temporaries')},
                              fits=plan['fits'], settings_compiled=len(plan['tried']))
        if not plan['fits']:
            result['skipped'] = (f"does not fit: the plan's peak {plan['peak'] / spot.GiB:.1f} GiB > "
                                 f"{plan['budget'] / spot.GiB:.1f} GiB ({plan['budget_source']})")
            return save()
    jax.clear_caches()          # the plan's programs: each length below compiles its own, timed
    t = time.perf_counter()
    frozen = jax.block_until_ready(device_params(cfg, dtype))
    result['weights_s'], result['after_weights_gib'] = time.perf_counter() - t, peak_bytes() and \
        peak_bytes() / spot.GiB
    save()
    last = 0.0
    for S in lengths:
        # a shorter length runs if it and the longest (about twice its time) end before the deadline
        if S != max(lengths) and time.time() + 3 * last > spec['deadline']:
            result['rows'].append({'S': S, 'positions': P + S, 'skipped': 'time budget'})
            continue
        t, before = time.perf_counter(), peak_bytes()
        try:
            row = bench_shape(cfg, tc, frozen, S, spec['steps'], spec['eval_batch'])
            row['peak_rose'] = None if before is None else row['measured_gib'] * spot.GiB > before
        except Exception as e:    # e.g. out of memory: the other lengths still run
            row = {'S': S, 'positions': P + S, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
        last = row['seconds'] = time.perf_counter() - t
        result['rows'].append(row)
        print(f"{size} S={S}: " + ', '.join(f'{k} {v:.3g}' for k, v in row.items() if isinstance(v, float)),
              flush=True)
        save()
    matmuls.append(matmul_flops_per_s(dtype, n))
    save()


# ------------------------------------------------------------------------------------------- the table
def peak_tflops(device_kind):
    return next((v for k, v in PEAK_TFLOPS if k.lower() in device_kind.lower()), None)


def finish_rows(results):
    """Flat rows with the derived numbers: tokens/s, TFLOP, MFU (model FLOPs, remat left out) against the
    table's peak, FLOP/s against the measured matmul, host time against the step."""
    rows = []
    for res in results:
        peak, matmul = peak_tflops(res.get('device_kind', '')), res.get('matmul_flops_per_s')
        plan = res.get('plan', {})
        for r in res.get('rows', []) or [{}]:
            row = {'size': res['size'], 'remat': plan.get('remat'),
                   'micro_batches': plan.get('micro_batches'), **r}
            for key in ('skipped', 'error'):
                if key in res and not r:
                    row[key] = res[key]
            if 'step_s' in r:
                model = r['forward_flops'] + r['backward_flops']
                row['step_tflops_per_s'] = model / r['step_s'] / 1e12
                row['mfu'] = peak and row['step_tflops_per_s'] / peak
                row['hfu'] = peak and (model + r['remat_flops']) / r['step_s'] / 1e12 / peak
                row['of_matmul'] = matmul and model / r['step_s'] / matmul
                row['eval_tflops_per_s'] = r['eval_flops'] / r['eval_s'] / 1e12
                row['eval_mfu'] = peak and row['eval_tflops_per_s'] / peak
                row['eval_of_matmul'] = matmul and r['eval_flops'] / r['eval_s'] / matmul
                row['host_over_step'] = r['host_s'] / r['step_s']
            rows.append(row)
    return rows


def fmt(x, spec='.2f', scale=1.0):
    return '-' if x is None else format(x * scale, spec)


def print_table(rows, dtype, batch):
    print(f'\nB={batch}, {P} prompt + S input positions, {T} targets, {dtype}. TFLOP: forward + backward '
          '(activations only; + remat recompute); MFU: model FLOPs (no remat) over the bf16 dense peak; '
          '"x matmul": the same FLOP/s over the measured matmul. host: batch prep + dispatch per step; '
          'loop: prep + step + sync, as train_prompt. Peak GiB: plan (step / eval) | measured (<=: did not '
          'rise).\n')
    print('| size | S (+P) | remat, micro | compile s (step + eval) | step s | host s | loop s | tokens/s '
          '| TFLOP (+remat) | MFU | x matmul | eval s (B) | eval MFU | plan GiB (step / eval) '
          '| measured GiB |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        head = (f"| {r['size']} | {r.get('S', '-')} ({r.get('positions', '-')}) | {r['remat']}, "
                f"{r['micro_batches']} |")
        if 'step_s' not in r:
            print(f"{head} {r.get('skipped') or r.get('error') or 'not run'} |" + ' |' * 11)
            continue
        measured = fmt(r['measured_gib'], '.1f')
        if r['measured_gib'] is not None and not r.get('peak_rose', True):
            measured = '<=' + measured
        compile_s = r['step_lower_s'] + r['step_compile_s'], r['eval_lower_s'] + r['eval_compile_s']
        print(f"{head} {compile_s[0]:.1f} + {compile_s[1]:.1f} | {r['step_s']:.3f} | "
              f"{r['host_s']:.4f} | {r['loop_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{(r['forward_flops'] + r['backward_flops']) / 1e12:.3g} (+{r['remat_flops'] / 1e12:.3g}) | "
              f"{fmt(r['mfu'], '.1%')} | {fmt(r['of_matmul'], '.1%')} | {r['eval_s']:.3f} "
              f"({r['eval_batch']}) | {fmt(r['eval_mfu'], '.1%')} | {r['plan_step_gib']:.3g} / "
              f"{r['plan_eval_gib']:.3g} | {measured} |")


# ------------------------------------------------------------------------------------------- main
def output_path(tiny, out):
    """--out, or the default; a tiny run never writes over a real result."""
    out = Path(out or (TINY_OUT if tiny else OUT))
    return TINY_OUT if tiny and out.resolve() == OUT.resolve() else out


def probe():
    """(backend, device kind) from a short child process: the parent never holds the accelerator."""
    code = 'import jax; print(jax.default_backend()); print(jax.devices()[0].device_kind)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-2:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default=None, help='comma separated, of ' + ','.join(SIZES) +
                   ' (default: base,xl,xxl on an accelerator, small,base on CPU)')
    p.add_argument('--lengths', default=None,
                   help='input lengths (default: SuperGLUE buckets and 512; CPU: the shortest of them)')
    p.add_argument('--dtype', default=None, choices=spot.DTYPES, help='default bfloat16; float32 on CPU')
    p.add_argument('--batch', type=int, default=B)
    p.add_argument('--eval-batch', type=int, default=None, help='greedy decoding batch (default --batch)')
    p.add_argument('--steps', type=int, default=None,
                   help='timed steps per way of timing, after one untimed (default 3; CPU 1)')
    p.add_argument('--remat', default='auto', choices=spot.REMATS)
    p.add_argument('--micro-batches', type=int, default=0, help='0: the memory plan decides')
    p.add_argument('--device-memory', type=float, default=None, help='GiB to plan for (default: the device)')
    p.add_argument('--time-budget', type=float, default=420, help='seconds for all sizes together')
    p.add_argument('--data', default=None,
                   help='t5_spiece.model and superglue/ (default: the fetch cache, data.data_root(); when '
                        'absent: SUPERGLUE_BUCKETS)')
    p.add_argument('--out', default=None, help=f'JSON file (default {OUT.relative_to(ROOT)})')
    p.add_argument('--tiny', action='store_true', help='random tiny T5, B=4, input length 32')
    p.add_argument('--print-buckets', action='store_true', help='compute SUPERGLUE_BUCKETS from --data')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = args.data or str(data.data_root())
    if args.child:
        return run_size(json.loads(Path(args.child).read_text()))
    if args.print_buckets:
        return print('SUPERGLUE_BUCKETS = {\n' + ''.join(f'    {t!r}: {v!r},\n' for t, v in
                                                          superglue_buckets(args.data).items()) + '}')
    backend, kind = probe()
    cpu = backend == 'cpu'
    if args.tiny:
        args.sizes, args.lengths, args.batch = 'tiny', args.lengths or '32', 4
    sizes = (args.sizes or ('small,base' if cpu else 'base,xl,xxl')).split(',')
    dtype = args.dtype or ('float32' if cpu else 'bfloat16')
    steps, eval_batch = args.steps or (1 if cpu else 3), args.eval_batch or args.batch
    out = output_path(args.tiny, args.out)
    lengths, lengths_source = input_lengths(args)
    if cpu and not args.lengths:                     # a Base step at 612 positions takes minutes on CPU
        lengths, lengths_source = lengths[:1], f'the shortest of {lengths_source}'
    print(f'{backend}: {kind}; sizes {sizes}, {dtype}, B={args.batch}, input lengths {lengths} '
          f'({lengths_source}); load average {os.getloadavg()[0]:.2f}', flush=True)
    t0, results, weight = time.time(), [], {'xl': 2, 'xxl': 3}
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(sizes):
            # the time left, shared by the sizes still to run in proportion to their weight
            left = t0 + args.time_budget - time.time()
            share = left * weight.get(size, 1) / sum(weight.get(s, 1) for s in sizes[i:])
            spec = {'size': size, 'dtype': dtype, 'batch': args.batch, 'eval_batch': eval_batch,
                    'lengths': lengths, 'steps': steps, 'remat': args.remat,
                    'micro_batches': args.micro_batches,
                    'device_memory': args.device_memory, 'deadline': time.time() + share,
                    'out': str(Path(tmp) / f'{size}.json')}
            Path(tmp, f'{size}.spec').write_text(json.dumps(spec))
            try:
                child = subprocess.run([sys.executable, __file__, '--child', str(Path(tmp, f'{size}.spec'))],
                                       stderr=subprocess.PIPE, text=True, timeout=max(share, 0) + 120)
                error = child.returncode and f'exit {child.returncode}: {child.stderr[-1500:]}'
            except subprocess.TimeoutExpired:
                error = f'killed after {max(share, 0) + 120:.0f} s'
            res = json.loads(Path(spec['out']).read_text()) if Path(spec['out']).exists() else {'size': size}
            if error:
                print(f'{size}: {error}', file=sys.stderr)
                res['error'] = error.splitlines()[0] if error.startswith('killed') else error[-300:]
            results.append(res)
    rows = finish_rows(results)
    print_table(rows, dtype, args.batch)
    for res in results:                              # the plan that chose remat and micro-batches
        plan = res.get('plan', {})
        print(f"{res['size']}: plan at {max(lengths)} + {P} positions: remat {plan.get('remat')}, "
              f"micro_batches {plan.get('micro_batches')}, peak {fmt(plan.get('peak'), '.3g')} GiB of "
              f"{fmt(plan.get('budget_gib'), '.3g')} ({plan.get('settings_compiled', 0)} settings compiled, "
              f"{fmt(plan.get('seconds'), '.0f')} s){'; ' + res['error'] if 'error' in res else ''}")
    matmul = [r['matmul_flops_per_s'] for r in results if r.get('matmul_flops_per_s')]
    kind_peak = peak_tflops(kind)
    print(f"\n{kind}: bf16 dense peak {fmt(kind_peak, '.1f')} TFLOP/s (PEAK_TFLOPS); {dtype} matmul measured "
          f"{fmt(max(matmul, default=None), '.4g', 1e-12)} TFLOP/s; {time.time() - t0:.0f} s in all; "
          f'load average {os.getloadavg()[0]:.2f}')
    report = {'config': {'sizes': sizes, 'dtype': dtype, 'batch': args.batch, 'eval_batch': eval_batch,
                         'prompt_len': P, 'target_len': T, 'lengths': lengths,
                         'lengths_source': lengths_source,
                         'steps': steps, 'tiny': args.tiny, 'time_budget': args.time_budget},
              'backend': backend, 'device_kind': kind, 'peak_tflops': kind_peak,
              'matmul_tflops_per_s': max(matmul, default=0) / 1e12 or None, 'jax': jax.__version__,
              'load_average': os.getloadavg(), 'seconds': time.time() - t0, 'sizes': results, 'rows': rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f'wrote {out}')
    return report


if __name__ == '__main__':
    main()
