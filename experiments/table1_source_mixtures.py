"""Table 1 of SPoT (Vu et al., ACL 2022): GLUE and SuperGLUE averages by source mixture, frozen T5 Base.

The averages after prompt tuning from a source prompt tuned on each of 14 source mixtures, against prompt
tuning from scratch (PromptTuning).
Recipe (§2.1-2.2, App. B-C): for each row and seed, a source prompt from sampled vocabulary, tuned 2^18 steps
on the row's tasks mixed examples-proportionally (K = 2^19); the final checkpoint is transferred (the paper
does not say which; §3.3 takes the final one of a mixture). From it, a target prompt on each of the 8 GLUE and
8 SuperGLUE tasks, 2^18 steps, scored by the best of the validation evaluations every 500 steps. PromptTuning
starts the target prompt from its class labels (App. C). "-30K" rows: 30K steps for source and target (our
reading of "- longer tuning"). Expected: paper_numbers.TABLE1 (GLUE 82.8 ± 0.2, SuperGLUE 73.2 ± 0.3 from
GLUE); SPOT_RESULTS=results pytest -m slow tests/test_paper_numbers.py checks each row within
max(2 std, 1 point).
  python3 experiments/table1_source_mixtures.py --model google/t5-base-lm-adapt --out results \
      [--rows GLUE MNLI]
Reruns resume every unfinished run from out/runs/. --tiny: random tiny T5, 16 examples per task, 4 steps.
Compute (FLOP count, inputs padded to 100 + 512 tokens, an accelerator sustaining 400 TFLOP/s, e.g. an H100
at ~40% of its bf16 peak; float32 is ~2x slower): one Base step = 7.7 TFLOP (forward + gradient w.r.t.
activations, batch 32), so a 2^18-step run ~ 2.0e18 FLOP ~ 1.4 h and a 30K run ~ 0.16 h. The table is
42 source + 720 target runs of 2^18 steps and 3 + 96 of 30K: ~1,100 accelerator-hours, plus evaluation
(up to ~30% more on the large validation sets: one decoding pass every 500 steps).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import dataclasses

import data
from experiments import common
from experiments.paper_numbers import TABLE1, paper_rows

SOURCES = {  # Table 1 row -> source tasks (App. B; C4, MNLI and SQuAD alone)
    "GLUE": data.MIXTURES["GLUE"], "C4": ("c4",), "MNLI": ("mnli",), "SQuAD": ("squad",),
    "SuperGLUE": data.MIXTURES["SuperGLUE"], "NLI": data.MIXTURES["NLI"],
    "Paraphrasing/similarity": data.MIXTURES["Paraphrase"], "Sentiment": data.MIXTURES["Sentiment"],
    "MRQA": data.MIXTURES["MRQA"], "RAINBOW": data.MIXTURES["RAINBOW"],
    "Translation": data.MIXTURES["Translation"],
    "Summarization": data.MIXTURES["Summarization"], "GEM": data.MIXTURES["GEM"],
    "All": ("c4",) + data.MIXTURES["All"],  # "C4 + 55 supervised tasks"
}
BENCHMARKS = {"GLUE": data.MIXTURES["GLUE"], "SuperGLUE": data.MIXTURES["SuperGLUE"]}  # §2.1: GLUE w/o WNLI
TINY_ROWS = ("PromptTuning", "GLUE", "MNLI")
TINY_BENCHMARKS = {"GLUE": ("rte", "mrpc"), "SuperGLUE": ("cb", "copa")}
LONG, SHORT = 2 ** 18, 30_000  # §2.1.4 "2^18 steps"; "- longer tuning" = Lester et al.'s 30K


def main(argv=None):
    args = common.parse_args(__doc__, argv, add_arguments=lambda p: p.add_argument(
        "--rows", nargs="+", choices=list(TABLE1), default=None, help="rows of Table 1 (default: all)"))
    rows = args.rows or (TINY_ROWS if args.tiny else list(TABLE1))
    benchmarks = TINY_BENCHMARKS if args.tiny else BENCHMARKS
    # 1. The frozen model and the tasks (loaded once, when first needed).
    cfg, frozen = common.frozen_model(args.model, args.tiny, args.dtype)
    tasks = {}

    def task(name):
        if name not in tasks:
            tasks[name] = common.load_task(name, args, args.train)
        return tasks[name]

    records = []
    for row in rows:
        source = row.removesuffix("-30K")
        steps = common.paper_steps(args, SHORT if row.endswith("-30K") else LONG)
        slug = row.replace("/", "_")
        for seed in range(args.seeds):
            tc = common.train_config(args, steps, seed)
            # 2. The source prompt: the row's tasks mixed examples-proportionally, K = 2^19 (§2.1, App. B).
            start = None
            if source != "PromptTuning":
                mix = {t: task(t).train for t in SOURCES[source]}
                start = common.tune_prompt(
                    frozen, cfg, tc, common.initial_prompt(frozen, args, seed, f"source-{row}"),
                    lambda k: data.mixture_batches(mix, tc.batch_size, seed, start=k), None,
                    args.runs / "table1" / f"source-{slug}-seed{seed}", args.log, args.mesh)["prompt"]
                del mix                 # release the source tasks that no target run reads (e.g. WMT, C4)
                for t in set(SOURCES[source]) - {t for names in benchmarks.values() for t in names}:
                    tasks.pop(t, None)
            # 3. Target prompt tuning on every GLUE and SuperGLUE task, from the source prompt (SPoT) or from
            #    the class labels (PromptTuning, App. C); the best validation score of the run counts.
            for bench, targets in benchmarks.items():
                for name in targets:
                    td = task(name)
                    prompt = start
                    if start is None:
                        prompt = common.initial_prompt(frozen, args, seed, name, td.label_ids)
                    res = common.tune_prompt(
                        frozen, cfg, tc, prompt,
                        lambda k: data.batches(td.train, tc.batch_size, seed, start=k), td.evaluate,
                        args.runs / "table1" / f"{slug}-{name}-seed{seed}", args.log, args.mesh)
                    records.append({"task": name, "seed": seed, "source": None if start is None else source,
                                    "method": row, "benchmark": bench, "score": res["score"],
                                    "metrics": res["metrics"]})
    # 4. Benchmark average per seed (footnote 5: a task's score is the mean of its metrics), mean ± std over
    #    seeds.
    summary = {}
    for row in rows:
        for bench in benchmarks:
            per_seed = [[r["score"] for r in records if r["method"] == row and r["benchmark"] == bench and
                         r["seed"] == s] for s in range(args.seeds)]
            summary[f"{row}/{bench}"] = common.mean_std([sum(x) / len(x) for x in per_seed])
    config = {"model": args.model, "rows": list(rows), "benchmarks": benchmarks, "seeds": args.seeds,
              "steps": {r: common.paper_steps(args, SHORT if r.endswith("-30K") else LONG) for r in rows},
              "train": dataclasses.asdict(args.train)}
    paper = paper_rows("table1_source_mixtures")
    return common.finish(args, "table1_source_mixtures", config, records, summary, paper)


if __name__ == "__main__":
    common.run_main(main)
