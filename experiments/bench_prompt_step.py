"""Benchmark (not a test): spot.train_step vs Hugging Face PEFT prompt tuning, same shapes, same invocation.

The shapes the PEFT benchmark measures: T5 1.1 Small and Base with random weights; B=8, 100 prompt + 128 input
tokens, 8 target tokens, dropout 0.1, float32 on CPU. Rounds alternate A (ours: `--steps` timed steps) and B
(Hugging Face PEFT, experiments/bench_peft_arm.py in a subprocess, same shape and steps); medians over all
rounds. PEFT needs torch, transformers and peft: `pip install -e '.[oracle]'` (with the README's CPU torch
index), or --peft-python PYTHON.
Prints s/step, tokens/s (B*(P+S+T) per second), the ratio ours/PEFT in tokens/s (target >= 1.25), jit
compile time and MFU: analytic prompt-step FLOPs (analytic_flops) over a float32 2048^3 matmul peak measured
here with jax.
`--variants dropout0,forward` adds arms to see where our time goes: dropout 0, and the forward pass alone.

    python3 experiments/bench_prompt_step.py [--shapes small,base] [--rounds 3] [--steps 5] [--variants] \
        [--peft-python PYTHON_WITH_PEFT] [--json out.json]

Runtime about 10 minutes on 2 cores. Keep the machine otherwise idle: the load average is printed before and
after.

Real data (`--real-data sst2,rte,boolq --batch-sizes 8,32`): the same examples of the task files that
`python3 data.py fetch` caches (fetched on first use; --data DIR for others) through data.batches (tokenized
per batch, padded to the bucket of the longest) and through PEFT with
DataCollatorForSeq2Seq(padding="longest") (bench_peft_arm.py --batches), rounds alternating on the same
batches; our time includes making the batch.
`--memory 50000000 --shapes tiny --batch-size 32`: peak RSS of 200 training steps on a lazily generated
source.
`--startup --shapes small,base`: seconds to the first step in fresh processes without/with the compile cache.
On an accelerator (no PEFT arm; `large`/`xl` shapes, bfloat16 weights, the paper's batch 32):
    python3 experiments/bench_prompt_step.py --no-peft --shapes base,xl --dtype bfloat16 --batch-size 32 \\
        --rounds 2
"""
import argparse
import dataclasses
import json
import os
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
from experiments import common

# shape -> T5Config name (tiny: --memory only)
SHAPES = {'tiny': 'tiny', 'small': 'google/t5-small-lm-adapt', 'base': 'google/t5-base-lm-adapt',
          'large': 'google/t5-large-lm-adapt', 'xl': 'google/t5-xl-lm-adapt'}
PEFT_ARM = ROOT / 'experiments' / 'bench_peft_arm.py'
# Prompt, input and target tokens: the PEFT benchmark's shapes. The batch is --batch-size (8).
P, S, T = 100, 128, 8


def analytic_flops(cfg, batch, enc_len, dec_len):
    """Matmul FLOPs (2 per multiply-add) of a forward pass and of a prompt-tuning step, the same count for
    both arms (MFU). enc_len includes the prompt. Counted: every projection (attention q, k, v, o; the
    cross-attention's k, v over all encoder positions; the FFN; the output layer) and the two attention
    products (scores, weighted values); not softmax, norms, GELU or look-ups. The step adds the gradient with
    respect to activations only (frozen weights: no weight gradients): once more each projection, twice each
    attention product (both of its operands are activations)."""
    d, hd, ffn = cfg.d_model, cfg.num_heads * cfg.d_kv, (3 if cfg.gated_gelu else 2) * cfg.d_model * cfg.d_ff
    S, T, L, Ld = enc_len, dec_len, cfg.num_layers, cfg.num_decoder_layers
    proj = batch * (S * L * (4 * d * hd + ffn) + Ld * (T * (6 * d * hd + ffn) + S * 2 * d * hd)
                    + T * d * cfg.vocab_size)
    attn = batch * hd * (L * 2 * S * S + Ld * 2 * T * (T + S))
    return {'forward': 2 * (proj + attn), 'prompt_step': 2 * (proj + attn) + 2 * proj + 4 * attn}


def matmul_peak(n=2048, reps=5, dtype=jnp.float32):
    """n x n x n matmul GFLOP/s with jax on this machine's default device."""
    a, b = jnp.ones((n, n), dtype), jnp.ones((n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


VARIANTS = {'dropout0': dict(dropout=0.0), 'one_batch': dict(sub_batches=1), 'forward': dict(mode='forward')}


class Ours:
    """A compiled spot.train_step (or a variant) on one shape, with its own prompt/optimizer state."""

    def __init__(self, cfg, frozen, batch, tc, mode='step', **overrides):
        tc = dataclasses.replace(tc, **overrides)      # overrides: TrainConfig fields, e.g. dropout=0.0
        self.frozen, self.batch, self.tc, self.step = frozen, batch, tc, 0
        self.prompt = spot.init_prompt(jax.random.key(1), frozen, spot.PromptConfig(length=P))
        self.opt_state = spot.make_optimizer(tc.optimizer).init(self.prompt)
        t = time.perf_counter()
        if mode == 'step':
            # as train_prompt runs it where the step fits: the backend's first remat setting (spot.plan_order)
            step_cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout, remat=spot.plan_order()[0][0])
            step_args = (self.prompt, self.opt_state, frozen, batch, spot.dropout_key(0, 0), step_cfg,
                         tc.optimizer, tc.z_loss, spot.sub_batch_count(tc))
            self.fn = spot.train_step.lower(*step_args).compile()
        else:   # forward only: the loss without dropout, no gradient
            loss_fn = jax.jit(spot.prompt_loss, static_argnames='cfg')
            self.fn = loss_fn.lower(self.prompt, frozen, batch, cfg).compile()
        self.compile_s, self.mode = time.perf_counter() - t, mode
        cost = self.fn.cost_analysis()                  # what the compiled program computes, as XLA counts it
        self.flops = (cost[0] if isinstance(cost, list) else cost or {}).get('flops')

    def __call__(self):
        if self.mode == 'step':
            self.prompt, self.opt_state, loss = self.fn(self.prompt, self.opt_state, self.frozen, self.batch,
                                                        spot.dropout_key(0, self.step))
        else:
            loss = self.fn(self.prompt, self.frozen, self.batch)
        self.step += 1
        return float(loss)          # the training loop syncs on the loss every step too (NaN check)


def time_calls(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def run_peft(args, cfg, *arm_args):
    """bench_peft_arm.py under --peft-python on cfg's shape: (seconds per timed step, versions)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [args.peft_python, str(PEFT_ARM), '--dims', json.dumps(dataclasses.asdict(cfg)),
               '--threads', str(args.threads), '--prompt-len', str(P), '--warmup', '1', '--dropout', '0.1',
               *arm_args, '--json', f'{d}/r.json']
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
        if out.returncode:
            sys.exit(f'PEFT arm failed ({" ".join(cmd)}):\n{out.stderr[-3000:]}\nIt needs torch, '
                     "transformers and peft: pip install -e '.[oracle]' (README: CPU torch), or pass "
                     '--peft-python with a Python that has them.')
        r = json.loads(Path(f'{d}/r.json').read_text())
    return r['all_s'], r['versions']


# --real-data: (folder of the fetch layout, split). BoolQ's training file (over 4 MiB) is not fetched: its
# validation examples (3,270, the same length distribution) stand in.
REAL_TASKS = {'sst2': ('glue', 'train'), 'rte': ('glue', 'train'), 'boolq': ('superglue', 'validation')}
REAL_FILES = {'sst2': 'glue/SST-2/train.tsv', 'rte': 'glue/RTE/train.tsv',
              'boolq': 'superglue/BoolQ/val.jsonl'}


def run_peft_real(args, cfg, rows):
    """PEFT on the given examples ([(input ids, target ids)] per step; the first is an untimed warm-up)."""
    with tempfile.TemporaryDirectory() as d:
        feats = [[{'input_ids': x, 'labels': y} for x, y in zip(*r)] for r in rows]
        Path(f'{d}/b.json').write_text(json.dumps({'batches': feats}))
        return run_peft(args, cfg, '--batches', f'{d}/b.json', '--vocab', str(args.vocab))


def pipeline_rate(source, batch_size, n=50):
    """Tokens (non-pad inputs + targets) per second that data.batches makes, alone, and its mean padded
    widths."""
    it, tokens, widths = data.batches(source, batch_size, seed=0), 0, []
    t = time.perf_counter()
    for _ in range(n):
        b = next(it)
        tokens += int((b['inputs'] != 0).sum() + (b['targets'] != 0).sum())
        widths.append(b['inputs'].shape[1])
    return tokens / (time.perf_counter() - t), float(np.mean(widths))


def real_data_main(args):
    """Ours (data.batches: per-batch tokenization, length buckets) vs PEFT (DataCollatorForSeq2Seq
    padding="longest") on the same examples of real tasks; per (shape, task, batch) rounds alternate the arms
    on the same batches."""
    tasks = args.real_data.split(',')
    if args.data is None or args.vocab is None:   # the defaults: the fetch cache, fetched if missing
        root = data.fetch([REAL_FILES[t] for t in tasks] + ['t5_spiece.model'])
        args.data, args.vocab = args.data or str(root), args.vocab or str(root / 't5_spiece.model')
    vocab, seed = data.load_vocab(args.vocab), 0
    load0 = os.getloadavg()
    print(f'load average {load0[0]:.2f}; jax {jax.__version__}, {os.cpu_count()} cores', flush=True)
    rows, versions = [], None
    for shape in args.shapes.split(','):
        cfg = t5_model.T5Config.from_name(SHAPES[shape])
        frozen = t5_model.init_params(jax.random.key(0), cfg)
        step_cfg = dataclasses.replace(cfg, remat=spot.plan_order()[0][0])   # as train_prompt picks it
        for task in tasks:
            folder, split = REAL_TASKS[task]
            pairs = data.load_pairs(task, split, Path(args.data) / folder, train=True)
            source = data.TextSource(pairs, vocab, data.MAX_INPUT_LEN, 8)
            for B in map(int, args.batch_sizes.split(',')):
                tc = spot.TrainConfig(batch_size=B)
                stc = (tc.optimizer, tc.z_loss, spot.sub_batch_count(tc))   # train_step's static arguments
                prompt = spot.init_prompt(jax.random.key(1), frozen, spot.PromptConfig(length=P))
                opt_state = spot.make_optimizer(tc.optimizer).init(prompt)
                n_steps = args.rounds * args.steps
                ids = [source.rows(data.batch_rows(len(source), B, seed, k)) for k in range(n_steps)]
                t, shapes = time.perf_counter(), {}
                for x, y in ids:                                  # compile each bucket shape once, untimed
                    b = data._collate(x, y, source.max_input_len, source.max_target_len)
                    shapes.setdefault((b['inputs'].shape, b['targets'].shape), b)
                for b in shapes.values():
                    prompt, opt_state, loss = spot.train_step(prompt, opt_state, frozen, b,
                                                              spot.dropout_key(0, 0), step_cfg, *stc)
                    float(loss)
                compile_s = time.perf_counter() - t
                times, paired, widths = {'ours': [], 'peft': []}, [], []
                for r in range(args.rounds):
                    it = data.batches(source, B, seed, start=r * args.steps)
                    for k in range(r * args.steps, (r + 1) * args.steps):
                        t = time.perf_counter()
                        b = next(it)                             # the pipeline's time counts
                        prompt, opt_state, loss = spot.train_step(prompt, opt_state, frozen, b,
                                                                  spot.dropout_key(0, k), step_cfg, *stc)
                        float(loss)
                        times['ours'].append(time.perf_counter() - t)
                        widths.append(b['inputs'].shape[1])
                    chunk = ids[r * args.steps:(r + 1) * args.steps]
                    peft_times, versions = run_peft_real(args, cfg, chunk[:1] + chunk)
                    times['peft'] += peft_times
                    last = statistics.median(times['ours'][-args.steps:])
                    paired.append(statistics.median(peft_times) / last)
                    print(f'{shape} {task} B={B} round {r + 1}: ours {last:.3f}, peft '
                          f'{statistics.median(peft_times):.3f} s/step', flush=True)
                ours, peft = (statistics.median(times[a]) for a in ('ours', 'peft'))
                longest = float(np.mean([max(map(len, x)) for x, _ in ids]))
                rows.append({'shape': shape, 'task': task, 'batch': B, 'ours_s': ours, 'peft_s': peft,
                             'ours_examples_per_s': B / ours, 'peft_examples_per_s': B / peft,
                             'ratio': peft / ours, 'paired_ratios': paired,
                             'ours_mean_width': float(np.mean(widths)), 'peft_mean_width': longest,
                             'compile_s': compile_s, 'compiled_shapes': len(shapes)})
    rates = {}
    for task in tasks:
        folder, split = REAL_TASKS[task]
        pairs = data.load_pairs(task, split, Path(args.data) / folder, train=True)
        rates[task] = pipeline_rate(data.TextSource(pairs, vocab, data.MAX_INPUT_LEN, 8), 32)[0]
    print('\npipeline alone (data.batches, B=32, 50 batches): ' + ', '.join(f'{t} {v:.0f} tokens/s'
                                                                          for t, v in rates.items()))
    load1 = os.getloadavg()
    print(f'\nload average before {load0[0]:.2f}, after {load1[0]:.2f}; PEFT {versions}\n')
    print('| shape | task | B | ours s/step | PEFT s/step | ours examples/s | PEFT examples/s | x PEFT | '
          'per round | input width ours / PEFT | compiled shapes (s) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['shape']} | {r['task']} | {r['batch']} | {r['ours_s']:.3f} | {r['peft_s']:.3f} | "
              f"{r['ours_examples_per_s']:.2f} | {r['peft_examples_per_s']:.2f} | {r['ratio']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in r['paired_ratios'])} | {r['ours_mean_width']:.0f} / "
              f"{r['peft_mean_width']:.0f} | {r['compiled_shapes']} ({r['compile_s']:.0f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({'load_before': load0, 'load_after': load1, 'rows': rows,
                                               'pipeline': rates, 'peft_versions': versions}, indent=1))


def generated_pair(i):
    """Example i of a generated source: 5 to 400 words, drawn from i (no file, nothing held)."""
    rng = np.random.default_rng(i)
    words = ' '.join(f'w{w}' for w in rng.integers(0, 5000, rng.integers(5, 400)))
    return {'inputs': f'example {i}: {words}', 'targets': 'positive' if i % 2 else 'negative'}


def memory_main(args):
    """Peak RSS of spot.train_prompt for --memory-steps steps on a lazily generated source of --memory
    examples."""
    import resource
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # noqa: E731  (KiB -> GiB)
    shape = args.shapes.split(',')[0]
    cfg = t5_model.T5Config.tiny() if shape == 'tiny' else t5_model.T5Config.from_name(SHAPES[shape])
    frozen = t5_model.init_params(jax.random.key(0), cfg)
    vocab = data.load_vocab(args.vocab or data.fetch(['t5_spiece.model']) / 't5_spiece.model')
    source = data.TextSource(data.LazyPairs(args.memory, generated_pair), vocab)
    tc = spot.TrainConfig(steps=args.memory_steps, batch_size=args.batch, log_every=50, checkpoint_every=100)
    before = rss()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        spot.train_prompt(spot.init_prompt(jax.random.key(0), frozen, spot.PromptConfig()), frozen, cfg, tc,
                          lambda k: data.batches(source, tc.batch_size, tc.seed, start=k), None, out)
    rate, width = pipeline_rate(source, args.batch)
    print(f'{shape}, {args.memory:,} generated examples, B={args.batch}, {args.memory_steps} steps in '
          f'{time.perf_counter() - t:.0f} s: peak RSS {rss():.2f} GiB ({before:.2f} GiB with the frozen '
          f'weights loaded, +{rss() - before:.2f} GiB for training); pipeline alone {rate:.0f} tokens/s, '
          f'mean width {width:.0f}')


def first_step(shape, B=8, S=64):
    """(seconds to build random weights, seconds to the first finished train_step) in this process."""
    cfg = t5_model.T5Config.from_name(SHAPES[shape])
    t = time.perf_counter()
    frozen = t5_model.init_params(jax.random.key(0), cfg)
    built, t = time.perf_counter() - t, time.perf_counter()
    prompt = spot.init_prompt(jax.random.key(1), frozen, spot.PromptConfig(length=P))
    tc = spot.TrainConfig(batch_size=B)
    batch = {'inputs': np.ones((B, S), np.int32), 'targets': np.ones((B, T), np.int32)}
    out = spot.train_step(prompt, spot.make_optimizer(tc.optimizer).init(prompt), frozen, batch,
                          spot.dropout_key(0, 0), cfg, tc.optimizer, tc.z_loss, spot.sub_batch_count(tc))
    float(out[2])
    return built, time.perf_counter() - t


def startup_main(args):
    """Time to the first step in fresh processes: the compilation cache off, then on twice (cold, then
    warm)."""
    with tempfile.TemporaryDirectory() as cache:
        for shape in args.shapes.split(','):
            for label, env in (('no cache', 'off'), ('cache, first run', cache),
                               ('cache, second run', cache)):
                t = time.perf_counter()
                out = subprocess.run([sys.executable, __file__, '--startup-child', shape],
                                     capture_output=True, text=True,
                                     env={**os.environ, 'SPOT_COMPILE_CACHE': env})
                if out.returncode:
                    sys.exit(out.stderr[-2000:])
                built, step = json.loads(out.stdout.strip().splitlines()[-1])
                print(f'{shape}, {label}: {time.perf_counter() - t:.1f} s from process start to the first '
                      f'step done (weights {built:.1f} s, compile + step {step:.1f} s); '
                      f'load {os.getloadavg()[0]:.1f}', flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shapes', default='small,base')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=5, help='timed steps per round and arm')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads for PEFT')
    p.add_argument('--peft-python', default=sys.executable,
                   help="a Python with torch, transformers and peft (pip install -e '.[oracle]', README)")
    p.add_argument('--variants', default='', help=f'extra arms, comma separated: {",".join(VARIANTS)}')
    p.add_argument('--no-peft', action='store_true', help='time ours only (e.g. on an accelerator)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='frozen weights')
    p.add_argument('--batch-size', '--batch_size', '--batch', dest='batch', type=int, default=8,
                   help='rows of the synthetic rounds (--real-data: --batch-sizes)')
    p.add_argument('--json', default=None)
    p.add_argument('--real-data', default='', help=f'tasks, comma separated: {",".join(REAL_TASKS)}')
    p.add_argument('--batch-sizes', default='8,32', help='--real-data: batch sizes')
    p.add_argument('--data', default=None,
                   help='--real-data: folder with glue/ and superglue/ (default: the fetch cache)')
    p.add_argument('--vocab', default=None, help='spiece.model (default: the fetch cache\'s t5_spiece.model)')
    p.add_argument('--memory', type=int, default=0,
                   help='peak RSS of training on a generated source of N examples')
    p.add_argument('--memory-steps', type=int, default=200)
    p.add_argument('--startup', action='store_true',
                   help='time to the first step with/without the compile cache')
    p.add_argument('--startup-child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.startup_child:
        spot.enable_compile_cache()
        return print(json.dumps(first_step(args.startup_child)))
    if args.startup:
        return startup_main(args)
    if args.real_data:
        return real_data_main(args)
    if args.memory:
        return memory_main(args)
    B, dtype = args.batch, jnp.dtype(args.dtype)

    load0, peaks = os.getloadavg(), [matmul_peak(dtype=dtype)]
    print(f'load average {load0[0]:.2f}; jax {jax.__version__}, {jax.devices()[0].device_kind}, '
          f'{os.cpu_count()} cores; {dtype.name} matmul {peaks[0]:.1f} GFLOP/s; B={B}', flush=True)
    rows, report = [], {'load_before': load0, 'shapes': {}}
    for shape in args.shapes.split(','):
        cfg = t5_model.T5Config.from_name(SHAPES[shape])
        frozen, with_peft = t5_model.init_params(jax.random.key(0), cfg, dtype), not args.no_peft
        rng = np.random.default_rng(1)
        batch = {'inputs': jnp.asarray(rng.integers(2, cfg.vocab_size, (B, S)), jnp.int32),
                 'targets': jnp.asarray(np.concatenate([rng.integers(2, cfg.vocab_size, (B, T - 1)),
                                                        np.ones((B, 1))], 1), jnp.int32)}
        tc = spot.TrainConfig(batch_size=B)
        arms = {'ours': Ours(cfg, frozen, batch, tc)}
        for v in filter(None, args.variants.split(',')):
            arms[f'ours, {v}'] = Ours(cfg, frozen, batch, tc, **VARIANTS[v])
        for arm in arms.values():
            arm()                                                   # warm-up
        times, paired, versions = {name: [] for name in [*arms, *['peft'] * with_peft]}, [], None
        for r in range(args.rounds):                               # A B A B ...: drift hits both arms alike
            for name, arm in arms.items():
                times[name] += time_calls(arm, args.steps)
            if with_peft:
                peft_times, versions = run_peft(args, cfg, '--batch', str(B), '--enc-len', str(S),
                                                '--dec-len', str(T), '--steps', str(args.steps))
                times['peft'] += peft_times
                paired.append(statistics.median(peft_times) / statistics.median(times['ours'][-args.steps:]))
            print(f'{shape} round {r + 1}: ' + ', '.join(f'{k} {statistics.median(v[-args.steps:]):.3f}'
                                                         for k, v in times.items()) + ' s/step', flush=True)
        flops = analytic_flops(cfg, B, S + P, T)
        peft_s = statistics.median(times['peft']) if with_peft else None
        for name, ts in times.items():
            med = statistics.median(ts)
            f = flops and (flops['forward'] if name.endswith('forward') else flops['prompt_step'])
            arm = arms.get(name)
            rows.append({'shape': shape, 'arm': name, 's_per_step': med,
                         'tokens_per_s': B * (P + S + T) / med,
                         'ratio_vs_peft': peft_s and peft_s / med, 'gflops': f and f / med / 1e9,
                         'compile_s': arm.compile_s if arm else None, 'n': len(ts),
                         'xla_gflop': arm.flops / 1e9 if arm and arm.flops else None})
        # The peak is the best of the measurements (other processes may share the CPU).
        peaks.append(matmul_peak(dtype=dtype))
        report['shapes'][shape] = {'times': times, 'paired_ratios': paired, 'flops': flops,
                                   'peft_versions': versions}
        if paired:
            print(f'{shape}: ours/PEFT tokens/s per round {[round(x, 2) for x in paired]}', flush=True)
    report['load_after'], peak = os.getloadavg(), max(peaks)
    report['peak_gflops'] = peaks
    for r in rows:
        r['mfu'] = r['gflops'] and r['gflops'] / peak
    print(f"\nload average after {report['load_after'][0]:.2f}; {dtype.name} matmul peak (best of "
          f"{[round(x) for x in peaks]}) {peak:.1f} GFLOP/s\n")
    print("MFU: the analytic step FLOPs (analytic_flops, the same for both arms) per second over "
          'the peak.\nGFLOP/step: what XLA counts in our compiled step; it is below the analytic count where '
          'cross-attention\nwith few target tokens skips the key/value projections '
          '(t5_model._attend_encoded).\n')
    print('| shape | arm | s/step | tokens/s | x PEFT tokens/s | MFU | GFLOP/step (analytic / XLA) '
          '| compile s |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if r['compile_s'] is not None else '-'
        ratio = f"{r['ratio_vs_peft']:.2f}" if r['ratio_vs_peft'] else '-'
        mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] else '-'
        gflop = (f"{r['gflops'] * r['s_per_step']:.0f}" if r['gflops'] else '-') + ' / ' + (
            f"{r['xla_gflop']:.0f}" if r['xla_gflop'] else '-')
        print(f"| {r['shape']} | {r['arm']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {ratio} "
              f"| {mfu} | {gflop} | {compile_s} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**report, 'rows': rows}, indent=1, default=str))


if __name__ == '__main__':
    common.run_main(main)
