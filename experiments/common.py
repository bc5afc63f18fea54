"""What experiments/*.py share: command line, frozen model, task data, one prompt-tuning run, results.

Task data comes from data.py (tfds, or the original files with --data). Under --tiny it is the first few
examples of the files in the cache that `python3 data.py fetch` fills (data.data_root()), or, where those are
missing, a synthetic task on token ids (token_task, also the quickstart's tasks); --tiny never downloads.
Results follow paper_numbers.RESULTS_SCHEMA.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import data
import spot
import t5_model

ROOT = Path(__file__).resolve().parents[1]
TINY_EXAMPLES = 16                          # --tiny: training and validation examples per task
# Runs that share a step (spot.train_prompts) by default: 8 prompts of one step read the frozen weights once.
# The memory plan (spot.resolve_memory) then fits the step of 8 runs' batches by remat and micro-batches.
RUNS_PER_STEP = 8


def run_main(main):
    """What a script runs when started from the shell: main(argv). An error the user can fix
    (spot.USER_ERRORS: a missing file, offline, a bad value) is one line on stderr; --debug or SPOT_DEBUG=1
    shows its traceback."""
    argv = sys.argv[1:]
    debug = "--debug" in argv or os.environ.get("SPOT_DEBUG", "") not in ("", "0")
    try:
        main([a for a in argv if a != "--debug"])
    except spot.USER_ERRORS as e:
        if debug:
            raise
        sys.exit(f"error: {' '.join(str(e).split())} (traceback: --debug)")


def tiny_out(out, tiny):
    """Where a run writes its results: OUT, or under --tiny OUT/tiny (OUT itself when it is named tiny), so
    that a tiny run never overwrites a real run's results/<name>.json or figures."""
    return str(Path(out) / "tiny") if tiny and Path(out).name != "tiny" else str(out)


def parse_args(doc, argv, model="google/t5-base-lm-adapt", add_arguments=None):
    p = argparse.ArgumentParser(description=doc.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=model, help="hub id or checkpoint directory (ignored with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="steps of every run (default: the paper's)")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs per setting (default 3, the paper's; --tiny 1)")
    p.add_argument("--out", default=str(ROOT / "results"),
                   help="folder for <name>.json, figures and runs/ (--tiny: OUT/tiny)")
    p.add_argument("--data", default=None, help="folder with the original task files (default: tfds)")
    p.add_argument("--tiny", action="store_true", help="random tiny T5, a handful of examples, a few steps")
    p.add_argument("--model-parallel", type=int, default=1,
                   help="devices per 'model' group of the mesh (spot.py)")
    p.add_argument("--dtype", default="float32", choices=spot.DTYPES,
                   help="frozen weights/activations (spot.py)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled steps on disk (spot.py)")
    p.add_argument("--debug", action="store_true", help="show an error's traceback (also SPOT_DEBUG=1)")
    p.add_argument("--runs-per-step", type=int, default=RUNS_PER_STEP,
                   help=f"runs that share a training step (default {RUNS_PER_STEP}; run_grid)")
    p.add_argument("--no-wait", action="store_true",
                   help="when the runs left are held by other workers, exit 0 saying so instead of waiting")
    if add_arguments:
        add_arguments(p)
    args, rest = p.parse_known_args(argv)
    args.out = tiny_out(args.out, args.tiny)
    # --tiny scores by rank classification: a random T5 never decodes a label word, so decoding would score 0
    tiny = dict(batch_size=4, max_input_len=32, max_target_len=8, eval_batch_size=16,
                eval_limit=TINY_EXAMPLES, eval_method="rank") if args.tiny else {}
    if args.runs_per_step < 1:
        p.error(f"--runs-per-step {args.runs_per_step}: must be >= 1")
    fields = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    spot.add_config_flags(fields)                      # any TrainConfig field: --batch_size 8, --batch-size=8
    known, rest = fields.parse_known_args(rest)
    if rest:
        p.error(f"unrecognised {rest}; TrainConfig fields are flags: --batch_size 8 (spot.py train --help)")
    try:
        args.train, _ = spot.override(spot.TrainConfig(**tiny), spot.config_flags(known))
    except ValueError as e:
        p.error(str(e))
    args.seeds = args.seeds or (1 if args.tiny else 3)  # §2.1.4: 3 runs per setting
    args.runs = Path(args.out) / "runs"  # under --tiny OUT/tiny/runs: tiny never resumes a real run
    args.log = None if args.tiny else print  # progress lines of spot.train_prompt
    args.mesh = spot.make_mesh(args.model_parallel) if jax.device_count() > 1 else None  # data/model parallel
    print(spot.device_summary(), flush=True)
    spot.enable_compile_cache("off" if args.no_compile_cache else None)   # reruns skip the step compiles
    return args


def paper_steps(args, steps):
    """The paper's step count, or --steps, or 4 under --tiny."""
    return args.steps or (4 if args.tiny else steps)


def embedding_step(steps):
    """§3.2 footnote 13: the prompt after 10K steps is the task embedding (a short run: after half of it)."""
    return min(10_000, max(1, steps // 2))


@functools.lru_cache(maxsize=2)
def frozen_model(name, tiny=False, dtype="float32"):
    """(cfg, params in dtype): a checkpoint (hub id or directory), or with tiny a random T5Config.tiny().
    Cached."""
    return spot.load_model("tiny" if tiny else name, 0, dtype)


def train_config(args, steps, seed, **changes):
    """spot.TrainConfig of one run: the paper's defaults (§2.1.4), --tiny's and --field=value overrides."""
    return dataclasses.replace(args.train, steps=steps, seed=seed, embedding_step=embedding_step(steps),
                               **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    name: str
    # data.batches' input: data.TextSource (real tasks) or data.ArraySource (synthetic)
    train: object
    evaluate: Callable         # (params, cfg, prompt or None) -> {metric x100, 'score'} on validation
    label_ids: list | None     # token ids of each class label (class-label prompt init, App. C)
    # (params, cfg) -> prompt -> the same scores; a spot.Evaluator for real tasks, so that the runs of one
    # step evaluate in shared batches (spot.score_together)
    scorer: Callable = None

    def score(self, params, cfg):
        return self.scorer(params, cfg) if self.scorer else lambda p: self.evaluate(params, cfg, p)


@functools.lru_cache(maxsize=1)
def vocab_for(model, tiny):
    """The model's SentencePiece vocabulary; --tiny: t5_spiece.model in the cache, or None (synthetic)."""
    if tiny:
        spiece = data.data_root() / "t5_spiece.model"
        return data.load_vocab(spiece) if spiece.exists() else None
    d = Path(model)
    return data.load_vocab(model if not d.is_dir() or (d / "spiece.model").exists() else None)


def load_task(name, args, tc, model=None):
    """Training source and a validation scorer of one task (data.py formats and metrics, T5 decoding).
    The vocabulary is the one of `model` (default --model); every T5 size shares it."""
    task, vocab = data.get_task(name), vocab_for(model or args.model, args.tiny)
    if vocab is not None:  # its ids must be rows of the model's embedding; config.json only, no weights
        model_cfg = t5_model.T5Config.tiny() if args.tiny else spot.model_config(model or args.model)
        spot.check_vocab(vocab, model_cfg, "tiny" if args.tiny else model or args.model)
    data_dir = data.data_root() if args.tiny else args.data
    T = tc.max_target_len or task.target_len  # as spot.make_evaluator
    if args.tiny and vocab is None:
        return synthetic_task(task.name, tc.max_input_len)
    # The training split, read per batch (data.train_source); C4 (no metric) has no validation to load.
    try:
        if args.tiny:
            train = data.load_examples(name, "train", data_dir)
        else:
            train = data.train_source(name, vocab, tc.max_input_len, T, data_dir)
        val = data.load_examples(name, "validation", data_dir) if task.metrics else []
    except (FileNotFoundError, ValueError):
        if not args.tiny:
            raise
        return synthetic_task(task.name, tc.max_input_len)  # e.g. MNLI: too large to be fetched
    val = val[:tc.eval_limit or None]
    # Training examples are tokenized per batch (data.TextSource: memory O(batch)); validation inputs are kept
    # as unpadded token ids, which spot.evaluate groups by length.
    source = train
    if args.tiny:
        pairs = data.text_pairs(name, train[:TINY_EXAMPLES], train=True)
        source = data.TextSource(pairs, vocab, tc.max_input_len, T)
    inputs = data.token_ids(vocab, [t["inputs"] for t in data.text_pairs(name, val)], tc.max_input_len)

    def evaluate(params, cfg, prompt=None):
        preds = spot.evaluate(params, cfg, prompt, inputs, vocab, method=tc.eval_method,
                              choices=[task.output_labels] * len(inputs), max_target_len=T,
                              batch_size=tc.eval_batch_size)
        return data.score(name, val, preds)
    labels = [list(vocab.encode(x)) for x in task.output_labels] if task.output_labels else None

    def scorer(params, cfg):
        return spot.Evaluator(name, val, inputs, task.output_labels, T, tc.eval_method, tc.eval_batch_size,
                              params, cfg, vocab)
    return TaskData(task.name, source, evaluate, labels, scorer)


# ------------------------------------------------------------------------------------------- synthetic tasks
def token_task(name, task_token, triggers, label_ids, words, n_train, n_val, seed, length=8, hits=2,
               width=None):
    """A classification task on token ids. An input is [task_token, length-2 words, EOS]: `hits` of the words
    come from triggers[c] for the example's class c, the rest uniformly from `words`; the target is
    [label_ids[c], EOS]. Scored by rank classification over the label ids (accuracy)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    x = np.zeros((n, width or length), np.int32)
    x[:, 1:length - 1] = rng.choice(words, (n, length - 2))
    y = rng.integers(0, len(label_ids), n)
    for row, c in zip(x, y):
        row[1 + rng.choice(length - 2, hits, replace=False)] = rng.choice(triggers[c], hits)
    x[:, 0], x[:, length - 1] = task_token, t5_model.EOS_ID
    targets = np.stack([np.asarray(label_ids)[y], np.full(n, t5_model.EOS_ID)], 1).astype(np.int32)
    candidates = [np.broadcast_to(np.array([lab, t5_model.EOS_ID], np.int32), (n_val, 2))
                  for lab in label_ids]

    def evaluate(params, cfg, prompt=None):
        scores = [t5_model.score_targets(params, cfg, x[n_train:], c, prompt) for c in candidates]
        accuracy = 100 * float(np.mean(np.argmax(np.stack(scores), 0) == y[n_train:]))
        return {"accuracy": accuracy, "score": accuracy}
    train = data.ArraySource(x[:n_train], targets[:n_train])
    return TaskData(name, train, evaluate, [[lab] for lab in label_ids])


def synthetic_task(name, width=32, target_width=8):
    """--tiny without the task's files: a token_task whose trigger words and labels are seeded by the name,
    padded to the widths of the real tiny tasks (one compiled step for all)."""
    tokens = np.random.default_rng(zlib.crc32(name.encode())).choice(np.arange(100, 5000), 19, replace=False)
    td = token_task(name, tokens[0], (tokens[3:11], tokens[11:19]), tokens[1:3], np.arange(5000, 9000),
                    TINY_EXAMPLES, TINY_EXAMPLES, zlib.crc32(name.encode()), width=width)
    targets = np.pad(td.train.targets, ((0, 0), (0, target_width - 2)))
    return dataclasses.replace(td, train=data.ArraySource(td.train.inputs, targets))


# ------------------------------------------------------------------------------------------- runs and results
def tune_prompt(frozen, cfg, tc, prompt, batches, evaluate, out_dir, log=print, mesh=None, **meta):
    """One prompt-tuning run (spot.train_prompt, §2.1.4): best validation checkpoint when `evaluate` is given,
    else the last. Resumes a run interrupted in out_dir (a finished one is read back, not rerun).
    Returns {'prompt', 'score', 'metrics', 'losses', 'embedding' (the prompt_step{tc.embedding_step}.npy)}."""
    score = evaluate and (lambda p: evaluate(frozen, cfg, p))
    res = spot.train_prompt(prompt, frozen, cfg, tc, batches, score, out_dir, meta=meta, resume=True,
                            mesh=mesh, log=log or (lambda *_: None))
    out = Path(out_dir)
    embedding = out / f"prompt_step{tc.embedding_step}.npy"
    info = json.loads((out / "prompt.json").read_text())
    return {"prompt": np.load(out / "prompt.npy"), "score": res["best_score"],
            "metrics": info.get("metrics"), "losses": res["losses"],
            "embedding": np.load(embedding) if embedding.exists() else None}


@dataclasses.dataclass(frozen=True, eq=False)
class GridRun:
    """One run of an experiment's grid (run_grid): its folder name under the experiment's runs, and how to
    make its spot.Run once the runs it `needs` (by name: e.g. the source prompt it starts from) are done."""
    name: str
    make: Callable             # (folder) -> spot.Run
    needs: tuple = ()
    task: str = ""             # runs of one task share a step first: their batches pad to similar buckets


def run_grid(args, grid, runs, frozen, cfg):
    """Train every run of `grid` (GridRun) under the folder `runs` that is not finished, --runs-per-step of
    them sharing each step (spot.train_prompts), and return {name: run_result} when all are finished.
    Many workers (processes, GPUs, hosts on one file system) may run the same command at once, with no
    coordinator: each claims runs whose folder nobody holds (run.lock, spot.own_folder; a folder taken
    meanwhile is skipped, not an error), skips finished ones, and resumes a folder whose holder died. A worker
    that finds the runs left held by others (or waiting on them) waits and polls, taking over any whose
    holder dies; with --no-wait it returns None saying what is left (exit 0; a rerun assembles the tables)."""
    poll, said = (0.2 if args.tiny else 10.0), None
    while True:
        left = [g for g in grid if not spot.finished(runs / g.name)]
        if not left:
            return {g.name: run_result(runs / g.name) for g in grid}
        done = {g.name for g in grid} - {g.name for g in left}
        ready = [g for g in left if set(g.needs) <= done]
        free = [g for g in ready if spot.folder_holder(runs / g.name) is None]
        free = sorted(free, key=lambda g: g.task != free[0].task)[:args.runs_per_step] if free else free
        if free:
            print(f"training {len(free)} runs together: {' '.join(g.name for g in free)}", flush=True)
            spot.train_prompts([g.make(runs / g.name) for g in free], frozen, cfg, resume=True,
                               mesh=args.mesh, log=args.log or (lambda *_: None),
                               runs_per_step=args.runs_per_step, skip_held=True)
            continue
        held = {g.name: spot.folder_holder(runs / g.name) for g in left}
        what = (f"{len(left)} of {len(grid)} runs left: {sum(map(bool, held.values()))} held by other "
                f"workers (" + ", ".join(f"{n}: {h}" for n, h in held.items() if h)[:300] + ")")
        if args.no_wait:
            print(f"{what}; exiting: rerun this command to assemble the tables once they are done")
            return None
        if what != said:
            print(f"{what}; waiting for them (a run whose worker dies is taken over)", flush=True)
            said = what
        time.sleep(poll)


def run_once(args, jobs, runs):
    """{name: fn()} for jobs {name: fn} that keep no checkpoint (model tuning), each done by one worker: the
    one that holds runs/<name>/run.lock while it runs; its JSON result is kept in runs/<name>/result.json,
    so that a rerun reads it. Held jobs are waited for (or with --no-wait: None, as run_grid)."""
    while True:
        for name, fn in jobs.items():
            folder = runs / name
            if (folder / "result.json").exists() or spot.folder_holder(folder):
                continue
            try:
                with spot.own_folder(folder):
                    if not (folder / "result.json").exists():
                        result = spot._json(fn(), None)    # numpy scores as numbers; NaN as null
                        spot._atomic(folder / "result.json", lambda f: f.write(result))
            except spot.RunFolderInUse:
                continue
        left = [n for n in jobs if not (runs / n / "result.json").exists()]
        if not left:
            return {n: json.loads((runs / n / "result.json").read_text()) for n in jobs}
        if args.no_wait:
            print(f"{len(left)} jobs left, held by other workers: {', '.join(left)}; exiting: rerun this "
                  f"command to assemble the tables once they are done")
            return None
        time.sleep(0.2 if args.tiny else 10.0)


def run_result(out):
    """A finished run's {'prompt' (its best, or last: prompt.npy), 'score' (best validation score), 'metrics',
    'embedding' (prompt_step<N>.npy, its task embedding, or None)}, read from its folder."""
    out = Path(out)
    with np.load(out / "checkpoint.npz") as z:
        state = json.loads(str(z["state"]))
    embedding = out / f"prompt_step{state['config']['embedding_step']}.npy"
    return {"prompt": np.load(out / "prompt.npy"), "score": state["best_score"],
            "metrics": json.loads((out / "prompt.json").read_text()).get("metrics"),
            "embedding": np.load(embedding) if embedding.exists() else None}


def initial_prompt(frozen, args, seed, name, label_ids=None):
    """The starting prompt of a run named `name` (its key folds in the name, so no two tasks share one):
    class labels when label_ids are given (the PromptTuning baseline, App. C), else sampled vocabulary
    (source prompts, §2.1.4)."""
    pc = spot.PromptConfig(length=8 if args.tiny else spot.PromptConfig.length,
                           init="class_labels" if label_ids else "sampled_vocab")
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    return spot.init_prompt(key, frozen, pc, label_ids or None)


def mean_std(values):
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}  # std over runs, ddof 0


def finish(args, experiment, config, records, summary, paper):
    """Print our rows beside the paper's, write out/<experiment>.json (RESULTS_SCHEMA); return the dict."""
    for row, ours in summary.items():
        ours["paper"] = list(paper[row]) if row in paper else None
    spread = f"mean ± std over {args.seeds} seeds" if args.seeds > 1 else "1 seed: no spread"
    print(f"\n{experiment}: ours ({spread}) vs paper" + (
        "  [--tiny: random tiny T5, a few steps: the numbers mean nothing]" if args.tiny else ""))
    for row, ours in summary.items():
        fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        p = ours["paper"] or (None, None)
        std = f" ± {fmt(ours['std']):<5}" if args.seeds > 1 else " " * 8
        print(f"  {row:<38} {fmt(ours['mean']):>7}{std}   paper {fmt(p[0])} ± {fmt(p[1])}")
    result = _finite({"experiment": experiment, "config": {**config, "tiny": args.tiny},
                      "results": records, "summary": summary})
    path = Path(args.out) / f"{experiment}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")   # workers that assemble at once: atomic
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False))
    tmp.replace(path)
    print(f"wrote {path}")
    return result


def _finite(x):
    """NaN/inf (e.g. Pearson of constant predictions) -> None, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x
