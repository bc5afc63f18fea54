"""experiments/bench_accelerator.py: its FLOP arithmetic against XLA's count, and a --tiny run's report.
The benchmark is a script that prints numbers; nothing here times anything."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

import spot
import t5_model
from experiments import bench_accelerator as bench

# Big enough that matmuls dominate XLA's count (norms, softmax and dropout are a few FLOPs per element).
CFG = t5_model.T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2,
                        num_decoder_layers=2, dropout_rate=0.0, name='bench-test')


def xla_flops(lowered):
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('T', [8, 64])            # cross-attention absorbed (8 targets) or projected (64)
def test_flops_match_xla_count_of_one_scanned_layer(T):
    """cost_analysis() counts a lax.scan body once: with 2 scanned layers it counts what the arithmetic
    gives for 1 layer per stack. Forward + backward + remat recompute, for each remat; greedy decoding's
    while body is one step."""
    B, S, P = 2, 56, 16
    assert t5_model._absorbs_cross(CFG, P + S, T) == (T == 8)
    one_layer = dataclasses.replace(CFG, num_layers=1, num_decoder_layers=1)
    shapes = jax.eval_shape(lambda k: t5_model.init_params(k, CFG), jax.random.key(0))
    prompt = jax.ShapeDtypeStruct((P, CFG.d_model), jnp.float32)
    tc = spot.TrainConfig(batch_size=B)
    opt_state = jax.eval_shape(spot.make_optimizer(tc.optimizer).init, prompt)
    batch = {'inputs': jax.ShapeDtypeStruct((B, S), jnp.int32),
             'targets': jax.ShapeDtypeStruct((B, T), jnp.int32)}
    # Projected cross-attention keys/values are made for all layers at once, outside the scan (vmap): XLA
    # counts the second layer's too, forward (and backward: once more, as for every matmul against weights).
    kv = 0 if T == 8 else B * 2 * 2 * (P + S) * CFG.d_model * CFG.num_heads * CFG.d_kv
    for remat in ('none', 'dots', 'layer'):
        lowered = spot.train_step.lower(prompt, opt_state, shapes, batch, spot.dropout_key(0, 0),
                                        dataclasses.replace(CFG, remat=remat), tc.optimizer, tc.z_loss, 1, 1)
        f = bench.step_flops(one_layer, B, S, T, P, remat)
        expected = f['forward'] + f['backward'] + f['remat'] + 2 * kv
        assert xla_flops(lowered) == pytest.approx(expected, rel=0.04), remat   # + elementwise ops
    lowered = t5_model.greedy_decode.lower(shapes, CFG, batch['inputs'], prompt, max_len=T)
    assert xla_flops(lowered) == pytest.approx(bench.eval_flops(one_layer, B, S, T, P, 1) + kv, rel=0.04)


def test_backward_is_activations_only():
    """No weight gradient: the backward pass costs the forward's matmuls against weights once and those
    between activations twice, so it lies between 1x and 2x the forward."""
    f = bench.step_flops(t5_model.T5Config.from_name('google/t5-xxl-lm-adapt'), 32, 512, 8, 100, 'layer')
    assert f['forward'] < f['backward'] < 2 * f['forward'] and 0 < f['remat'] < f['forward']
    assert bench.step_flops(CFG, 32, 512, 8, 100, 'none')['remat'] == 0


def test_length_table_is_what_the_superglue_files_give(shared_data):
    """SUPERGLUE_BUCKETS (what a machine without the files runs) equals data.bucket_length over the
    validation batches; if not, `--print-buckets` regenerates it."""
    assert bench.superglue_buckets(shared_data) == bench.SUPERGLUE_BUCKETS


def test_tiny_never_writes_the_real_result():
    assert bench.output_path(tiny=True, out=None) == bench.TINY_OUT
    assert bench.output_path(tiny=True, out=str(bench.OUT)) == bench.TINY_OUT
    assert bench.output_path(tiny=False, out=None) == bench.OUT


def test_tiny_run_prints_the_table_and_writes_every_field(tmp_path, capsys):
    report = bench.main(['--tiny', '--out', str(tmp_path / 'bench.json')])
    assert json.loads((tmp_path / 'bench.json').read_text()) == json.loads(json.dumps(report))
    (row,) = report['rows']
    assert row['size'] == 'tiny' and row['remat'] in spot.REMATS and row['micro_batches'] >= 1, row
    positive = ('step_s', 'eval_s', 'host_s', 'loop_step_s', 'batch_prep_s', 'dispatch_s', 'tokens_per_s',
                'step_lower_s', 'step_compile_s', 'eval_compile_s', 'forward_flops', 'backward_flops',
                'eval_flops', 'step_tflops_per_s', 'eval_tflops_per_s', 'of_matmul', 'host_over_step',
                'plan_step_gib', 'plan_eval_gib')
    for name in positive:
        assert math.isfinite(row[name]) and row[name] > 0, (name, row[name])
    assert row['remat_flops'] >= 0 and row['compiles_while_timed'] == 0, row
    assert row['tokens_per_s'] == pytest.approx(row['batch'] * (row['positions'] + bench.T) / row['step_s'])
    assert report['matmul_tflops_per_s'] > 0 and report['config']['tiny'] is True
    (size,) = report['sizes']
    assert size['plan']['remat'] == row['remat'] and size['host_rss_peak_gib'] > 0
    table = capsys.readouterr().out
    assert '| size | S (+P) |' in table and f"| tiny | {row['S']} ({row['positions']}) |" in table
