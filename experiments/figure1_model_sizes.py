"""Figure 1 / Table 4 (App. A) of SPoT (Vu et al., ACL 2022): SuperGLUE validation average by T5 size.

Methods: SPoT, PromptTuning, ModelTuning and Multi-task ModelTuning; GPT-3 few-shot (PromptDesign) is quoted
from the paper.

Recipe, per size (Small..XXL) and seed, on the 8 SuperGLUE tasks (best validation score, evaluations every
500):
  PromptTuning: the frozen LM-adapted T5 (google/t5-{size}-lm-adapt), class-label prompt, 30K steps
      (Lester et al.; Base = Table 1's PromptTuning-30K row).
  SPoT: a source prompt on the GLUE mixture (2^18 steps, final checkpoint), then each target 2^18 steps
      (Base = Table 1's GLUE row).
  ModelTuning (App. C, footnote 3): EVERY weight of the original T5 1.1 (google/t5-v1_1-{size}) tuned on each
      target with model_tuning_step: Adafactor lr 1e-3, dropout 0.1, 2^16 tokens per batch (128 x 512),
      2^18 steps (T5's fine-tuning default: our assumption). Not SPoT: a separate loop below, model_tuning().
  Multi-task ModelTuning: the same, first on the GLUE mixture (2^18 steps), then on each target.
  python3 experiments/figure1_model_sizes.py --out results [--sizes small base]
Model tuning keeps no checkpoints (no resume). Compute (FLOP count as in table1_source_mixtures.py,
400 TFLOP/s): prompt-tuning step / model-tuning step (3x the FLOPs of a forward, 4x the batch) =
Small 1.8 / 11 TFLOP, Base 7.7 / 46, Large 27 / 162, XL 97 / 583, XXL 379 / 2,273. Per size: 24 PromptTuning
runs (30K), 27 SPoT runs and 51 model-tuning runs (2^18): Small ~110, Base ~480, Large ~1,700, XL ~6,000,
XXL ~23,000 accelerator-hours.
Expected: paper_numbers.TABLE4 (e.g. SPoT/xxl 91.2 ± 0.1, Multi-task ModelTuning/xxl 90.1 ± 0.2);
SPOT_RESULTS=results pytest -m slow tests/test_paper_numbers.py checks each row within max(2 std, 1 point).
--tiny: one random tiny T5 plays both models; 16 examples per task, 4 steps.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data
import spot
from experiments import common
from experiments.paper_numbers import SIZES, TABLE4, paper_rows

LONG, SHORT = 2 ** 18, 30_000  # §2.1.4; Lester et al.'s PromptTuning in Fig. 1: 30K steps
GLUE, SUPERGLUE = data.MIXTURES["GLUE"], data.MIXTURES["SuperGLUE"]
TINY_GLUE, TINY_SUPERGLUE = ("rte", "mrpc"), ("cb", "copa")


# App. C: ModelTuning uses T5 defaults: Adafactor, constant lr 0.001, dropout 0.1, parameter scaling on
# (T5X Adafactor default), no weight decay; 2^16 tokens per batch = 128 inputs of 512 tokens. The paper also
# restores the pre-training optimizer state: we cannot (the released checkpoints carry no optimizer state),
# but its step counter continues from T5 1.1's 1M steps (checkpoint_1000000), as decay_offset does for the
# prompt runs.
MODEL_TUNING = spot.OptimizerConfig(learning_rate=1e-3, param_scale=True, weight_decay=0.0,
                                    decay_offset=-1_000_000)
MODEL_TUNING_TOKENS = 2 ** 16


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "z_loss"), donate_argnames=("params", "opt_state"))
def model_tuning_step(params, opt_state, batch, key, cfg, opt=MODEL_TUNING, z_loss=1e-4):
    """ModelTuning baseline (Figure 1, App. C): every parameter trains, no prompt; dropout cfg.dropout_rate.
    opt_state = spot.make_optimizer(opt).init(params). Returns (params, opt_state, loss)."""
    loss, grad = jax.value_and_grad(lambda p: spot.prompt_loss(None, p, batch, cfg, key, z_loss))(params)
    updates, opt_state = spot.make_optimizer(opt).update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def model_tuning(params, cfg, tc, batches, evaluate=None, log=None, mesh=None):
    """ModelTuning (App. C): every parameter trains, no prompt. -> (params, best validation metrics or None).
    With `evaluate`, the returned metrics are the best of the evaluations every tc.eval_every steps."""
    params = spot.shard_params(mesh, jax.tree.map(jnp.array, params))  # a copy: the step donates its params
    opt_state, data_iter, best = spot.make_optimizer(tc.optimizer).init(params), batches(0), None
    train_cfg = dataclasses.replace(cfg, dropout_rate=tc.dropout)  # the run's dropout (TrainConfig.dropout)
    for step in range(1, tc.steps + 1):
        batch = spot.shard_batch(mesh, next(data_iter))
        key = spot.dropout_key(tc.seed, step - 1)
        params, opt_state, loss = model_tuning_step(params, opt_state, batch, key, train_cfg, tc.optimizer,
                                                    tc.z_loss)
        if log and step % tc.log_every == 0:
            log(f"model tuning step {step}/{tc.steps}  loss {float(loss):.4f}")
        if evaluate and (step % tc.eval_every == 0 or step == tc.steps):
            metrics = evaluate(params, cfg)
            best = metrics if best is None or metrics["score"] > best["score"] else best
    return params, best


def main(argv=None):
    def add_arguments(p):
        p.add_argument("--model-tuning-model", default="google/t5-v1_1-{size}",
                       help="T5 1.1 for model tuning")
        p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))

    args = common.parse_args(__doc__, argv, model="google/t5-{size}-lm-adapt", add_arguments=add_arguments)
    sizes = ["tiny"] if args.tiny else args.sizes
    glue, superglue = (TINY_GLUE, TINY_SUPERGLUE) if args.tiny else (GLUE, SUPERGLUE)
    vocab_model = args.model.format(size=sizes[0])  # all T5 sizes share one vocabulary
    tasks = {name: common.load_task(name, args, args.train, vocab_model) for name in (*glue, *superglue)}
    glue_mix, records = {t: tasks[t].train for t in glue}, []
    for size in sizes:
        # 1. The frozen LM-adapted T5 (prompt methods) and the original T5 1.1 (model tuning, footnote 3).
        cfg, frozen = common.frozen_model(args.model.format(size=size), args.tiny, args.dtype)
        mt_model = args.model_tuning_model.format(size=size)
        mt_cfg, mt_params = common.frozen_model(mt_model, args.tiny, args.dtype)
        runs = args.runs / "figure1" / size
        grid, settings = [], {}

        def run(tc, start, batches, evaluate=None):
            return lambda out: spot.Run(start(), tc, batches, evaluate, out)
        for seed in range(args.seeds):
            tc, pt = (common.train_config(args, common.paper_steps(args, n), seed) for n in (LONG, SHORT))
            mt = dataclasses.replace(  # App. C: T5's fine-tuning defaults, 2^16 tokens per batch
                tc, optimizer=MODEL_TUNING,
                batch_size=tc.batch_size if args.tiny else MODEL_TUNING_TOKENS // tc.max_input_len)
            settings[seed] = mt
            # 2. SPoT's source prompt on the GLUE mixture; each SuperGLUE target with PromptTuning and SPoT
            #    (from the source once it is done). The best validation score of each run counts.
            source = f"source-GLUE-seed{seed}"
            grid.append(common.GridRun(source, run(tc, functools.partial(
                common.initial_prompt, frozen, args, seed, "source-GLUE"),
                functools.partial(data.mixture_batches, glue_mix, tc.batch_size, seed))))
            for name in superglue:
                td = tasks[name]
                batches = functools.partial(data.batches, td.train, tc.batch_size, seed)
                grid.append(common.GridRun(f"PromptTuning-{name}-seed{seed}", run(pt, functools.partial(
                    common.initial_prompt, frozen, args, seed, name, td.label_ids), batches,
                    td.score(frozen, cfg)), task=name))
                start = functools.partial(np.load, runs / source / "prompt.npy")
                grid.append(common.GridRun(f"SPoT-{name}-seed{seed}", run(tc, start, batches,
                                                                          td.score(frozen, cfg)),
                                           needs=(source,), task=name))
        # Every prompt run, R sharing a step, split over as many workers as run this command (run_grid).
        done = common.run_grid(args, grid, runs, frozen, cfg)
        if done is None:
            return None
        for seed in range(args.seeds):
            for name in superglue:
                for method in ("PromptTuning", "SPoT"):
                    res = done[f"{method}-{name}-seed{seed}"]
                    records.append({"task": name, "seed": seed,
                                    "source": "GLUE" if method == "SPoT" else None,
                                    "method": f"{method}/{size}", "score": res["score"],
                                    "metrics": res["metrics"]})

        # 3. ModelTuning and Multi-task ModelTuning (no checkpoints): one claim per seed (common.run_once), so
        #    that workers splitting the grid never tune the same seed twice.
        def tune_models(seed, mt):
            multitask, _ = model_tuning(mt_params, mt_cfg, mt, lambda k: data.mixture_batches(
                glue_mix, mt.batch_size, seed, k), log=args.log, mesh=args.mesh)
            got = []
            for name in superglue:
                td = tasks[name]
                for method, start in (("ModelTuning", mt_params), ("Multi-task ModelTuning", multitask)):
                    _, best = model_tuning(start, mt_cfg, mt,
                                           lambda k: data.batches(td.train, mt.batch_size, seed, k),
                                           td.evaluate, args.log, args.mesh)
                    got.append({"task": name, "seed": seed,
                                "source": "GLUE" if start is multitask else None,
                                "method": f"{method}/{size}", "score": best["score"], "metrics": best})
            return got
        jobs = {f"model-tuning-seed{seed}": functools.partial(tune_models, seed, mt)
                for seed, mt in settings.items()}
        tuned = common.run_once(args, jobs, runs)
        if tuned is None:
            return None
        records += [r for got in tuned.values() for r in got]
    # 4. SuperGLUE average per seed, mean ± std over seeds (Table 4); GPT-3 quoted.
    summary = {}
    for row in dict.fromkeys(r["method"] for r in records):
        per_seed = [[r["score"] for r in records if r["method"] == row and r["seed"] == s]
                    for s in range(args.seeds)]
        summary[row] = common.mean_std([sum(x) / len(x) for x in per_seed])
    print("PromptDesign (GPT-3 few-shot, quoted from Table 4 at GPT-3's sizes): "
          + ", ".join(f"{s} {v[0]}" for s, v in TABLE4["PromptDesign (GPT-3)"].items()))
    config = {"model": args.model, "model_tuning_model": args.model_tuning_model, "sizes": sizes,
              "glue": list(glue), "superglue": list(superglue), "seeds": args.seeds,
              "train": dataclasses.asdict(args.train), "model_tuning": dataclasses.asdict(MODEL_TUNING)}
    paper = paper_rows("figure1_model_sizes")
    return common.finish(args, "figure1_model_sizes", config, records, summary, paper)


if __name__ == "__main__":
    common.run_main(main)
