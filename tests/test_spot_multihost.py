"""spot.py across processes (JAX's multi-controller runtime), with real processes on 127.0.0.1: each
process has 2 CPU devices (--xla_force_host_platform_device_count) and joins through jax.distributed (gloo
collectives). A run on 2 processes x 2 devices must train, checkpoint, evaluate and resume to the prompt of
one process with 4 devices, with one consistent run folder written by process 0 alone; every peer wait is
bounded (--distributed-timeout), so a failure cannot hang CI."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ORACLE_INSTALL, f32_atol

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train_args(shared_data, model, out, mp, *extra):
    return ['spot.py', 'train', '--model', str(model), '--task', 'sst2', '--data', str(shared_data / 'glue'),
            '--vocab', str(shared_data / 't5_spiece.model'), '--out', str(out), '--model-parallel', str(mp),
            '--batch_size=4', '--length=4', '--max_input_len=16', '--eval_every=2', '--checkpoint_every=2',
            '--eval_limit=8', '--eval_batch_size=4', '--log_every=1', *extra]


def launch(args, processes, devices_per_process):
    """Run `python args` as `processes` processes (one coordinator on a free loopback port).

    Returns [(rc, output)], one per process."""
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
           'JAX_PLATFORMS': 'cpu'}
    join = ['--coordinator', f'127.0.0.1:{free_port()}', '--num-processes', str(processes),
            '--distributed-timeout', '30'] if processes > 1 else []
    procs = [subprocess.Popen([sys.executable, *args, *join, *(['--process-id', str(i)] if join else [])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    try:
        return [(p.wait(timeout=TIMEOUT), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
    """A tiny T5 1.1 written by transformers (config.json + model.safetensors), with T5's 32128-row
    vocabulary, so every process reads its blocks of each tensor from the file."""
    torch = pytest.importorskip('torch', reason=ORACLE_INSTALL)
    transformers = pytest.importorskip('transformers',
                                       reason=ORACLE_INSTALL)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
                                feed_forward_proj='gated-gelu', tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    d = tmp_path_factory.mktemp('hf_tiny')
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize('mp', [2, 1])
def test_two_processes_train_and_resume_as_one(shared_data, hf_checkpoint, tmp_path, mp):
    multi, single = tmp_path / 'multi', tmp_path / 'single'
    first = launch(train_args(shared_data, hf_checkpoint, multi, mp, '--steps', '4'), 2, 2)
    assert all(rc == 0 for rc, _ in first), first
    lead, other = first[0][1], first[1][1]
    assert 'in 2 processes' in lead and 'best score' in lead and 'best score' not in other
    resumed = launch(train_args(shared_data, hf_checkpoint, multi, mp, '--steps', '6', '--resume'), 2, 2)
    assert all(rc == 0 for rc, _ in resumed), resumed
    assert 'resuming' in resumed[0][1] and 'at step 4' in resumed[0][1]
    [(rc, out)] = launch(train_args(shared_data, hf_checkpoint, single, mp, '--steps', '6'), 1, 4)
    assert rc == 0, out
    # One consistent run: process 0's files only, each event once, the prompt of a one-process run of
    # 4 devices.
    assert sorted(f.name for f in multi.iterdir()) == sorted(f.name for f in single.iterdir())
    events = [json.loads(line) for line in (multi / 'metrics.jsonl').read_text().splitlines()]
    assert [(e['step'], 'eval' in e) for e in events] == [(s, e) for s in range(1, 7) for e in (False, True)
                                                          if not e or s % 2 == 0]
    for name in ('prompt.npy', 'checkpoint.npz'):
        a, b = np.load(multi / name), np.load(single / name)
        a, b = (a['prompt'], b['prompt']) if name.endswith('.npz') else (a, b)
        # The same sums over the same device layout, another process boundary: float32 rounding at most.
        print(f'mp {mp} {name}: max |multi - single| {np.abs(a - b).max():.3g} '
              f'(max |prompt| {np.abs(b).max():.3g})')
        np.testing.assert_allclose(a, b, rtol=0, atol=max(1e-5 * np.abs(b).max(), f32_atol(b, 100)))
    assert json.loads((multi / 'prompt.json').read_text())['step'] == json.loads(
        (single / 'prompt.json').read_text())['step']


def test_multi_process_refusals_reach_every_process(shared_data, hf_checkpoint, tmp_path):
    """A decision process 0 takes on the folder (here: refuse to overwrite a run) ends every process, none
    hangs; a --model-parallel that splits a host's devices is refused before anything loads."""
    out = tmp_path / 'run'
    first = launch(train_args(shared_data, hf_checkpoint, out, 1, '--steps', '2'), 2, 2)
    assert all(rc == 0 for rc, _ in first)
    again = launch(train_args(shared_data, hf_checkpoint, out, 1, '--steps', '2'), 2, 2)
    assert [rc for rc, _ in again] == [1, 1], again
    assert all('holds a run (checkpoint.npz)' in o for _, o in again), again
    split = launch(train_args(shared_data, hf_checkpoint, tmp_path / 'x', 4, '--steps', '2'), 2, 2)
    assert [rc for rc, _ in split] == [1, 1], split
    assert all('--model-parallel 4 does not divide the 2 devices of one host' in o for _, o in split), split


def test_a_process_whose_peers_never_come_says_so_and_exits_in_one_line(shared_data, tmp_path):
    """Regression: one process of a multi-process start whose peers never came waited silently, then aborted
    with a C++ stack trace after --distributed-timeout. Now it says whom it waits for within seconds, and at
    the timeout exits 1 in one line. Process 0 (which serves the coordinator) and process 1 (which connects to
    it), each started alone."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    ports = {i: free_port() for i in (0, 1)}

    def alone(i):
        join = ['--coordinator', f'127.0.0.1:{ports[i]}', '--num-processes', '2', '--process-id', str(i),
                '--distributed-timeout', '4']
        args = train_args(shared_data, 'tiny', tmp_path / str(i), 1)
        return subprocess.Popen([sys.executable, *args, *join], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    procs = {i: alone(i) for i in (0, 1)}
    for i, p in procs.items():
        try:
            waiting = p.stdout.readline()                       # the first line, 2 s into the wait
            out, err = p.communicate(timeout=TIMEOUT)
        finally:
            p.kill()
        where = f'coordinator 127.0.0.1:{ports[i]}'
        assert waiting == f'process {i}: waiting for 2 processes at {where} (up to 4 s, ' \
                          f'--distributed-timeout)\n', (waiting, out, err)
        assert p.returncode == 1 and err.count('\n') == 1, (p.returncode, err)     # no C++ stack trace
        assert err.startswith(f'error: process {i}: the 2 processes did not all reach {where} within 4'), err
        assert not (tmp_path / str(i)).exists()


def test_weights_read_block_by_block_equal_the_whole_file(hf_checkpoint):
    """load_model with a mesh builds each leaf from the blocks its devices hold (make_array_from_callback
    over the memory-mapped file): the same values as reading each tensor whole, in the shardings
    param_shardings asks for; and a random model is created already sharded."""
    code = '''if True:
        import sys, jax, numpy as np, spot, t5_model
        mesh = spot.make_mesh(2)
        cfg, whole = t5_model.load_checkpoint(sys.argv[1])
        for name in (sys.argv[1], 'tiny'):
            _, placed = spot.load_model(name, 0, 'float32', mesh)
            want = spot.param_shardings(mesh, placed)
            assert all(x.sharding == s for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(want)))
        _, placed = spot.load_model(sys.argv[1], 0, 'float32', mesh)
        for path, x in jax.tree_util.tree_leaves_with_path(whole):
            y = placed
            for k in path:
                y = y[k.key]
            assert np.array_equal(np.asarray(x), np.asarray(y)), path
        assert "'model'" in str(placed['encoder']['layers']['attention']['out']['kernel'].sharding)
        _, bf16 = spot.load_model(sys.argv[1], 0, 'bfloat16', mesh)
        kernel = whole['decoder']['logits_dense']['kernel']
        assert np.array_equal(np.asarray(bf16['decoder']['logits_dense']['kernel']),
                              np.asarray(kernel.astype(jax.numpy.bfloat16)))
        print('ok')
    '''
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
    r = subprocess.run([sys.executable, '-c', code, str(hf_checkpoint)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr
