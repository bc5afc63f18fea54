"""Benchmark (not a test): R prompt-tuning runs sharing one step (spot.train_prompts) against R separate runs.

Runs r = 0..R-1 tune a prompt on CB, RTE, COPA, CB, ... (real SuperGLUE files, --data), seed r, on random
T5 1.1 Small weights (the shape is what is timed); no evaluation. Arms, each in a fresh process without the
compile cache (so each pays its compiles, as separate jobs do):
  batched R: one process, the R runs in one vmapped step;   separate R: R processes, one run each.
Prints wall seconds per run, compiles (count, seconds), peak RSS, and the accelerator model of one step: FLOPs
(bench_prompt_step.analytic_flops, the same count for both) and bytes read (the frozen weights once per step
and the activations per example), both by arithmetic.

    python3 data.py fetch superglue     # the files, into the cache (data.data_root())
    python3 experiments/bench_runs_per_step.py --runs 1,3,8 --steps 4
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: repo root

TASKS = ('cb', 'superglue_rte', 'copa')


def arm(args):
    """One process: args.runs_in_process runs (ids args.first..) in one train_prompts call; JSON on stdout."""
    import dataclasses
    import tempfile

    import jax

    import data
    import spot
    import t5_model
    t0 = time.perf_counter()
    cfg = t5_model.T5Config.from_name('google/t5-small-lm-adapt')
    frozen = t5_model.init_params(jax.random.key(0), cfg)
    vocab = data.load_vocab(Path(args.data) / 't5_spiece.model')
    tc = spot.TrainConfig(steps=args.steps, batch_size=args.batch_size, max_input_len=args.max_input_len,
                          eval_every=10 ** 9, checkpoint_every=10 ** 9, log_every=1, embedding_step=0,
                          remat='none', micro_batches=1)
    runs, out = [], Path(tempfile.mkdtemp())
    for r in range(args.first, args.first + args.count):
        task, run_tc = TASKS[r % len(TASKS)], dataclasses.replace(tc, seed=r)
        source = data.train_source(task, vocab, tc.max_input_len, 0, args.data, r)
        prompt = spot.init_prompt(jax.random.key(r), frozen, spot.PromptConfig())
        runs.append(spot.Run(prompt, run_tc, lambda k, s=source, t=run_tc: data.batches(s, t.batch_size,
                                                                                         t.seed, k),
                             None, out / f'run{r}'))
    lines = []
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    spot.train_prompts(runs, frozen, cfg, log=lines.append)
    train = time.perf_counter() - t
    found = (re.search(r'first step done in ([\d.]+) s', line) for line in lines)
    compile_s = [float(m.group(1)) for m in found if m]
    print(json.dumps({'setup_s': setup, 'train_s': train, 'compiles': len(compile_s),
                      'compile_and_first_step_s': sum(compile_s),
                      'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def launch(args, first, count):
    cmd = [sys.executable, __file__, '--arm', '--data', args.data, '--steps', str(args.steps),
           '--batch-size', str(args.batch_size), '--max-input-len', str(args.max_input_len),
           '--first', str(first), '--count', str(count)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, 'SPOT_COMPILE_CACHE': 'off'})
    return {**json.loads(done.stdout.strip().splitlines()[-1]), 'wall_s': time.perf_counter() - t}


def step_model(R, batch, enc_len, dec_len):
    """FLOPs and bytes of one step of R runs on T5 1.1 Small (float32), by arithmetic."""
    import t5_model
    from experiments.bench_prompt_step import analytic_flops
    cfg = t5_model.T5Config.from_name('google/t5-small-lm-adapt')
    flops = R * analytic_flops(cfg, batch, enc_len, dec_len)['prompt_step']
    weights = 4 * t5_model.param_count(cfg)
    # activations a backward pass reads back, per example and layer: ~16 [S,D] + 4 [S,F] float32 (as
    # spot.rough_step_bytes) and the logits [T,V] (3 reads: forward, softmax, backward)
    layers = cfg.num_layers + cfg.num_decoder_layers
    per_example = layers * enc_len * (16 * cfg.d_model + 4 * cfg.d_ff) * 4 + 3 * dec_len * cfg.vocab_size * 4
    return {'flops': flops, 'weight_bytes': weights, 'activation_bytes': R * batch * per_example}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=None,
                   help='folder with superglue/{CB,RTE,COPA} and t5_spiece.model (default: data.data_root())')
    p.add_argument('--runs', default='1,3,8')
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--max-input-len', type=int, default=128)
    p.add_argument('--arm', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--first', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--count', type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.data is None:
        import data
        args.data = str(data.data_root())
    if args.arm:
        return arm(args)
    print(f'load average before: {os.getloadavg()}', flush=True)
    for R in map(int, args.runs.split(',')):
        batched = launch(args, 0, R)
        separate = [launch(args, r, 1) for r in range(R)]
        total = {k: sum(s[k] for s in separate) for k in ('wall_s', 'train_s', 'compiles',
                                                          'compile_and_first_step_s')}
        print(json.dumps({'R': R, 'batched': batched, 'separate_sum': total,
                          'separate_peak_rss_gib': max(s['peak_rss_gib'] for s in separate)}), flush=True)
        print(f'R={R}: batched {batched["wall_s"] / R:.1f} s/run wall ({batched["compiles"]} compiles, '
              f'{batched["compile_and_first_step_s"]:.1f} s), separate {total["wall_s"] / R:.1f} s/run '
              f'({total["compiles"]} compiles, {total["compile_and_first_step_s"]:.1f} s)', flush=True)
    for R in (1, 8):
        print('model', R, json.dumps(step_model(R, 32, 100 + 256, 8)))
    print(f'load average after: {os.getloadavg()}')


if __name__ == '__main__':
    main()
