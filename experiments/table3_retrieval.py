"""Table 3 and Figures 4, 5, 8 of SPoT (Vu et al., ACL 2022, §3.2-3.3, App. F-G): retrieval of source prompts.

Pick source prompts for a target by the similarity of task embeddings (prompts after 10K steps), instead of
trying all 48.
Input: table6_transferability.py's runs (same --out): 16 source tasks x 3 seeds = 48 source prompts with
their 10K-step embeddings, 3 BASELINE runs per target whose 10K-step prompts are the target's embeddings, and
the score of every source prompt transferred to every target (source seed r -> target seed r). For each
target, embedding run r and metric (§3.2: per-token average cosine, cosine of average tokens), rank the 48
prompts (§3.3), then:
BEST OF TOP-k (k = 1..15): the best Table 6 score among the top k; ORACLE: the best of all 48;
TOP-k WEIGHTED AVERAGE (per-token): one new 100K-step target run from sum_r alpha_r rho_r;
TOP-k MULTI-TASK MIXTURE (per-token): a new 2^18-step source prompt on the top-k tasks and the target mixed,
final checkpoint, then a 100K target run.
Rows aggregate the 10 targets (stats.aggregate_targets: run r pairs with baseline run r, footnote 15).
Expected: paper_numbers.TABLE3 (BASELINE 74.7, per_token/best_of_top_k/3 77.5 ± 0.4, ORACLE 80.7);
SPOT_RESULTS=results pytest -m slow tests/test_paper_numbers.py checks each row within max(2 std, 1 point).
  python3 experiments/table6_transferability.py --model google/t5-base-lm-adapt --out results   # first
  python3 experiments/table3_retrieval.py --model google/t5-base-lm-adapt --out results
Compute beyond Table 6 (as in table1_source_mixtures.py): 120 weighted-average target runs of 100K steps
(~0.54 h each) and, for the mixtures, up to 120 source runs of 2^18 steps (~1.4 h; equal top-k task sets are
trained once) plus 120 target runs: ~300 accelerator-hours. --tiny runs table6 --tiny first when needed.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

import data
import retrieval
import spot
from experiments import common, figures, stats, table6_transferability
from experiments.paper_numbers import EXPERIMENT_COMMANDS, FIG8, paper_rows
from experiments.table6_transferability import SOURCE_STEPS, TARGET_STEPS

KS, AVERAGE_KS = (1, 3, 6, 9, 12, 15), (3, 6, 9, 12)  # Table 3's k; §3.3: k searched in {3, 6, 9, 12}


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    # 1. Table 6's runs: source prompts, task embeddings, and the score of every transfer.
    path = Path(args.out) / "table6_transferability.json"
    if args.tiny and not path.exists():
        table6_transferability.main(["--tiny", "--out", str(args.out), "--seeds", str(args.seeds)])
    if not path.exists() or json.loads(path.read_text())["config"]["tiny"] != args.tiny:
        sys.exit(f"error: no table 6 runs ({'tiny' if args.tiny else 'real'}) in {path}: run "
                 f"`{EXPERIMENT_COMMANDS['table6_transferability']}` with this --out first")
    t6 = json.loads(path.read_text())
    sources, targets, seeds, runs = (t6["config"][k] for k in ("sources", "targets", "seeds", "runs"))
    args.seeds = seeds  # one target-embedding run per Table 6 seed
    # Table 6's runs under this --out (the JSON's path may be relative to another working directory, or
    # moved).
    runs = args.runs / "table6" if (args.runs / "table6").is_dir() else Path(runs)
    e_src, e_tgt = (common.embedding_step(t6["config"]["steps"][k]) for k in ("source", "target"))
    score = {(r["source"], r["seed"], r["task"]): r["score"] for r in t6["results"] if r["method"] == "SPoT"}
    baseline = {t: [r["score"] for r in sorted(t6["results"], key=lambda r: r["seed"])
                    if r["method"] == "BASELINE" and r["task"] == t] for t in targets}
    library = [retrieval.PromptEntry(s, np.load(runs / f"source-{s}-seed{r}" / f"prompt_step{e_src}.npy"),
                                     run=r)
               for s in sources for r in range(seeds)]
    transferred = {(e.task, e.run): np.load(runs / f"source-{e.task}-seed{e.run}" / "prompt.npy")
                   for e in library}
    embeddings = {t: [np.load(runs / f"baseline-{t}-seed{r}" / f"prompt_step{e_tgt}.npy")
                      for r in range(seeds)]
                  for t in targets}

    cfg, frozen = common.frozen_model(args.model, args.tiny, args.dtype)
    tasks, records, scores = {}, [], {}

    def task(name):
        if name not in tasks:
            tasks[name] = common.load_task(name, args, args.train)
        return tasks[name]

    def run(name, start, seed, mixture=None):
        """A target run (best validation checkpoint) or, with `mixture`, a mixture source (last)."""
        steps = common.paper_steps(args, SOURCE_STEPS if mixture else TARGET_STEPS)
        tc = common.train_config(args, steps, seed)
        if mixture:
            batches = functools.partial(data.mixture_batches, mixture, tc.batch_size, seed)
        else:
            batches = functools.partial(data.batches, task(name).train, tc.batch_size, seed)
        evaluate = None if mixture else task(name).score(frozen, cfg)
        return lambda out: spot.Run(start(), tc, batches, evaluate, out)

    def add(row, tgt, r, value, source=None):
        scores.setdefault(row, {}).setdefault(tgt, []).append(value)
        records.append({"task": tgt, "seed": r, "source": source, "method": row, "score": value,
                        "metrics": None})

    # 2. Retrieval by each similarity (§3.3); scores of BEST OF TOP-k and ORACLE come from Table 6's runs.
    n, grid, trained = len(library), {}, []   # trained: (row, tgt, r, run name, source) of the new runs
    for tgt in targets:
        for r, emb in enumerate(embeddings[tgt]):
            transfer = lambda e: score[(e.task, e.run, tgt)]  # noqa: E731
            entry, best = retrieval.oracle(library, transfer)  # the same for every r: std 0, as in the paper
            add("ORACLE", tgt, r, best, entry.task)
            add("BASELINE", tgt, r, baseline[tgt][r])
            for metric in retrieval.SIMILARITIES:
                ranking = retrieval.rank_sources(emb, library, metric)
                for k in (k for k in KS if k <= n):
                    entry, best = retrieval.best_of_top_k(ranking, k, transfer)
                    add(f"{metric}/best_of_top_k/{k}", tgt, r, best, entry.task)
            # 3. New target runs (per-token ranking): TOP-k WEIGHTED AVERAGE of the transferred prompts, and
            #    TOP-k MULTI-TASK MIXTURE (a source prompt on the top-k tasks + the target, final checkpoint).
            ranking = [(dataclasses.replace(e, prompt=transferred[(e.task, e.run)]), s)
                       for e, s in retrieval.rank_sources(emb, library, "per_token")]
            for k in (k for k in AVERAGE_KS[:1 if args.tiny else None] if k <= n):
                try:
                    start, how = retrieval.top_k_weighted_average(ranking, k), "similarity weights"
                except ValueError:  # the top-k similarities sum to <= 0 (near-random prompts, e.g. --tiny)
                    start = np.mean([e.prompt for e in retrieval.top_k(ranking, k)], 0)
                    how = "uniform weights"
                name = f"average{k}-{tgt}-seed{r}"
                grid[name] = common.GridRun(name, run(tgt, lambda start=start: start, r), task=tgt)
                trained.append((f"per_token/weighted_average/{k}", tgt, r, name, how))
                mix_tasks = retrieval.top_k_mixture_tasks(ranking, k, tgt)
                key = "+".join(sorted(mix_tasks))  # equal task sets share one run
                mixture = f"mixture-{key}-seed{r}"
                init = functools.partial(common.initial_prompt, frozen, args, r, f"mixture-{key}")
                sources_of = {t: task(t).train for t in mix_tasks}
                grid[mixture] = common.GridRun(mixture, run(tgt, init, r, sources_of))
                name = f"{key}-to-{tgt}-seed{r}"
                start = functools.partial(np.load, runs.parent / "table3" / mixture / "prompt.npy")
                grid[name] = common.GridRun(name, run(tgt, start, r), needs=(mixture,), task=tgt)
                trained.append((f"per_token/mixture/{k}", tgt, r, name, key))
    # The new runs, R sharing a step, split over as many workers as run this command (run_grid).
    done = common.run_grid(args, list(grid.values()), runs.parent / "table3", frozen, cfg)
    if done is None:
        return None
    for row, tgt, r, name, source in trained:
        add(row, tgt, r, done[name]["score"], source)

    # 4. Table 3: average over targets, absolute and relative change over BASELINE, mean ± std over runs r.
    summary = {}
    for row, by_target in scores.items():
        agg = stats.aggregate_targets(by_target, baseline)
        summary[row] = {"mean": agg["avg_score"][0], "std": agg["avg_score"][1],
                        "abs_change": list(agg["abs_change"]), "rel_change": list(agg["rel_change"])}
    # 5. Fig. 4 (similarity of all tasks, cosine of average tokens, clustered) and Figs. 5, 8 (similarity to
    #    each source prompt, averaged over the target's runs, against the transfer's relative error
    #    reduction).
    panels = {}
    for t in targets:
        b = min(np.mean(baseline[t]), 99.9)
        panels[t] = ([retrieval.task_similarity(embeddings[t], e.prompt, "average_tokens") for e in library],
                     [retrieval.relative_error_reduction(score[(e.task, e.run, t)], b) for e in library])
    try:
        groups = {**retrieval.group_by_task(library), **embeddings}
        out = Path(args.out)
        matrix = retrieval.similarity_matrix(groups, "average_tokens")
        print("Fig. 4:", figures.plot_similarity_clustermap(matrix, list(groups),
                                                              out / "figure4_task_similarity.png"))
        fig5 = {t: panels[t] for t in targets if t in ("STS-B", "CB", "WSC", "RTE")} or panels
        figures.plot_similarity_vs_transfer(fig5, out / "figure5_similarity_vs_transfer.png")
        fig8 = figures.plot_similarity_vs_transfer(panels, out / "figure8_similarity_vs_transfer.png")
        for t, (r_, p) in fig8.items():  # r is undefined (nan) when every transfer scores the same
            r_, p = (r_, p) if np.isfinite(r_) else (None, None)
            summary[f"fig8_pearson_r/{t}"] = {"mean": r_, "std": None, "p": p}
            ours = "undefined (all transfers score the same)" if r_ is None else f"{r_:.3f} (p {p:.2g})"
            print(f"Fig. 8 {t}: Pearson r {ours}; paper {FIG8[t][0] if t in FIG8 else '-'}")
    except ImportError as e:
        print(f"Figs. 4, 5, 8 skipped ({e}): pip install -e '.[plots]'")
    config = {"model": args.model, "table6": str(path), "sources": sources, "targets": targets,
              "target_runs": seeds, "library_size": n, "embedding_steps": {"source": e_src, "target": e_tgt},
              "train": dataclasses.asdict(args.train)}
    paper = paper_rows("table3_retrieval")
    return common.finish(args, "table3_retrieval", config, records, summary, paper)


if __name__ == "__main__":
    common.run_main(main)
