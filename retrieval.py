"""Prompts as task embeddings (Vu et al. 2022, SPoT §3): task similarity and source retrieval.

§3.2 task similarity .. cosine_average_tokens, cosine_per_token, task_similarity, similarity_matrix
§3.3 retrieval ........ rank_sources, top_k, best_of_top_k, oracle, top_k_weighted_average,
                        top_k_mixture_tasks
§3.1 transfer ......... relative_error_reduction (the tables' statistics: experiments/stats.py)
prompt library ........ PromptEntry, save_to_library, load_library, group_by_task
CLI: python3 retrieval.py rank --target T.npy --library DIR --metric per_token --k 3
"""
import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- §3.2 similarity of two prompts [P, D]

def cosine_average_tokens(e1, e2):
    """SPoT §3.2 "Cosine Similarity of Average Tokens": cos(mean_i e1_i, mean_j e2_j).
    Example: [[1,0],[0,1]] vs [[1,0]] -> cos([.5,.5], [1,0]) = 0.7071."""
    m1, m2 = (np.mean(np.asarray(e, dtype=np.float64), axis=0) for e in (e1, e2))
    return float(_unit(m1) @ _unit(m2))


def cosine_per_token(e1, e2):
    """SPoT §3.2 "Per-token Average Cosine Similarity": mean over all P1*P2 pairs of cos(e1_i, e2_j).
    Example: [[1,0],[0,1]] vs [[1,0]] -> (1 + 0) / 2 = 0.5. A prompt's similarity with itself averages
    its P^2 token pairs too, so it is below 1 unless all its tokens are parallel (Google's released
    prompts: 0.03-0.04, their tokens being nearly orthogonal)."""
    # mean_ij <u_i, v_j> = <mean_i u_i, mean_j v_j> for unit tokens u, v: O(P D) instead of O(P^2 D).
    return float(_unit(e1).mean(0) @ _unit(e2).mean(0))


def _unit(x):
    """x / |x| along the last axis, in float64. A zero vector has no direction: refused, as its NaN
    similarity would scramble a ranking (NaN compares false)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("a prompt has a zero vector: its cosine similarity is undefined")
    return x / norm


SIMILARITIES = {"per_token": cosine_per_token, "average_tokens": cosine_average_tokens}


def task_similarity(runs1, runs2, metric: str = "per_token"):
    """Mean similarity over all run pairs (SPoT footnote 14: the 3 x 3 runs of two tasks). runs: one prompt
    [P, D] or its runs (a list of [P, D], or [R, P, D]); metric: a name in SIMILARITIES."""
    sim = SIMILARITIES[metric]  # §3.2: a task's embedding = its prompt after 10K steps
    return float(np.mean([sim(a, b) for a in _runs(runs1) for b in _runs(runs2)]))


def similarity_matrix(runs_by_task, metric="per_token"):
    """{task: prompt or runs} -> [n, n] task_similarity matrix, rows in the dict's order (Figs. 4, 7)."""
    runs = list(runs_by_task.values())
    return np.array([[task_similarity(a, b, metric) for b in runs] for a in runs], dtype=np.float64)


def _runs(x):
    runs = isinstance(x, (list, tuple)) and np.ndim(x[0]) == 2
    return list(x) if runs or np.ndim(x) == 3 else [x]


# ---------------------------------------------------------------- §3.3 retrieval

@dataclasses.dataclass(frozen=True, eq=False)
class PromptEntry:
    """One stored prompt [P, D] and what it was tuned on; metadata fields are None when unknown."""
    task: str
    prompt: np.ndarray
    run: int | None = None
    step: int | None = None
    model: str | None = None
    score: float | None = None
    path: Path | None = None


def rank_sources(target, library, metric="per_token"):
    """[(PromptEntry, similarity)] for the library's prompts, the most similar to the target first.
    `target`: a prompt [P, D] or several runs of it (similarity averaged over them, as in Fig. 5)."""
    # §3.3: each of the 48 source prompts (16 tasks x 3 runs) is scored on its own
    sims = [task_similarity(target, entry.prompt, metric) for entry in library]
    order = sorted(range(len(library)), key=lambda i: -sims[i])  # stable: ties keep library order
    return [(library[i], sims[i]) for i in order]


def top_k(ranking, k):
    """The k highest-ranked entries: the source prompts BEST OF TOP-k tries (SPoT §3.3)."""
    return [entry for entry, _ in ranking[:k]]


def best_of_top_k(ranking, k, scores):
    """SPoT §3.3 BEST OF TOP-k: tune the target once from each of the top-k prompts, keep the best.
    `scores`: a callable PromptEntry -> target score, or the k scores in top_k order. -> (entry, score)."""
    return oracle(top_k(ranking, k), scores)


def oracle(library, scores):
    """SPoT §3.3 ORACLE: brute-force best over every source prompt. -> (entry, score)."""
    entries = list(library)
    scores = [scores(e) for e in entries] if callable(scores) else list(scores)
    i = int(np.argmax(scores))
    return entries[i], float(scores[i])


def top_k_weights(ranking, k):
    """alpha_r = sim_r / sum_{l<=k} sim_l (SPoT §3.3, TOP-k WEIGHTED AVERAGE)."""
    sims = np.array([sim for _, sim in ranking[:k]])
    if sims.sum() <= 0:
        raise ValueError(f"the top-{k} similarities sum to {sims.sum():.4g} <= 0: the weights are undefined")
    return sims / sims.sum()


def top_k_weighted_average(ranking, k):
    """SPoT §3.3 TOP-k WEIGHTED AVERAGE: one target init, sum_r alpha_r rho_r. -> prompt [P, D]."""
    prompts = np.stack([np.asarray(e.prompt, dtype=np.float64) for e in top_k(ranking, k)])
    return np.einsum("k,kPD->PD", top_k_weights(ranking, k), prompts)


def top_k_mixture_tasks(ranking, k, target_task):
    """SPoT §3.3 TOP-k MULTI-TASK MIXTURE: the distinct source tasks among the top-k prompts, in rank
    order, plus the target task; their data are mixed examples-proportionally (data.mixture_rates)."""
    tasks = list(dict.fromkeys(e.task for e in top_k(ranking, k)))
    return tasks + [target_task] if target_task not in tasks else tasks


# ---------------------------------------------------------------- §3.1 transfer

def relative_error_reduction(score, baseline):
    """SPoT §3.1: 100 (s - b) / (100 - b), in %. Example: (97.0, 92.7) -> 58.9 (MNLI -> CB)."""
    score, baseline = np.asarray(score, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    out = 100 * (score - baseline) / (100 - baseline)  # a baseline of 100 leaves no error to reduce
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------- prompt library on disk

def save_to_library(directory, prompt, task, run=0, step=None, model=None, score=None):
    """Write <task>-run<run>[-step<step>].npy plus a JSON sidecar with the metadata; returns the .npy path."""
    prompt = np.asarray(prompt, dtype=np.float32)
    # numpy / jax scalars (np.int64 run, np.float32 score) as plain JSON numbers, checked before any write
    meta = json.loads(json.dumps({"task": task, "run": run, "step": step, "model": model, "score": score},
                                 default=lambda x: np.asarray(x).tolist()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task}-run{run}" + (f"-step{step}" if step is not None else ""))
    sidecar = directory / f"{stem}.json"
    if sidecar.exists() and (old := _read_json(sidecar).get("task")) != meta["task"]:  # "a/b" vs "a_b"
        raise ValueError(f"{sidecar} holds task {old!r}, not {task!r}, under the same file name")
    np.save(directory / f"{stem}.npy", prompt)  # the official Checkpointer also stores prompts as .npy
    sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    return directory / f"{stem}.npy"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # bad JSON
        raise ValueError(f"cannot read {path}: {e}") from None


def load_library(directory):
    """Every prompt under `directory`, searched recursively, as a PromptEntry: .npy files, T5X prompt files
    and checkpoint folders, PEFT adapter folders, and run folders of `spot.py train` (their task embedding,
    prompt_step<N>.npy, §3.2; else prompt.npy). A JSON sidecar <stem>.json gives task/run/step/model/score;
    without one (e.g. Google's released sst2.npy) the task is the stem; a run folder's task is the one it
    was trained on (its sidecar), else the folder's name."""
    import spot  # the one prompt reader (load_prompt); imported here: retrieval's math needs no jax
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"prompt library {directory} is not a directory")
    entries, seen = [], set()

    def visit(folder):
        if folder.resolve() in seen:  # a symlink loop
            return
        seen.add(folder.resolve())
        if spot.is_run_folder(folder):  # its task embedding, under its sidecar's task, else the folder's name
            path = spot.run_prompt_file(folder, embedding=True)
            return add(path, path.with_suffix(".json"), folder.name)
        for path in sorted(folder.iterdir()):
            prompt_folder = (path / spot.PEFT_CONFIG).is_file() or (path / spot.T5X_PROMPT).is_file()
            if path.is_dir() and not prompt_folder:
                visit(path)
            elif prompt_folder or path.suffix == ".npy" or path.name.endswith(spot.T5X_PROMPT):  # not README
                t5x = path.name.removesuffix(spot.T5X_PROMPT).rstrip(".")
                stem = (path.stem if path.suffix == ".npy" else t5x) or path.name
                sidecar = folder / f"{stem}.json"
                add(path, sidecar, None if sidecar.exists() else stem)

    def add(path, sidecar, task):  # task: when the sidecar names none (None: it must)
        meta = _read_json(sidecar) if sidecar.exists() else {}
        if not isinstance(meta, dict) or meta.get("task", task) is None:
            raise ValueError(f"{sidecar} has no 'task' field")
        fields = {k: meta.get(k) for k in ("run", "step", "model", "score")}
        prompt = np.asarray(spot.load_prompt(path), np.float64)  # checked: finite, non-empty [P, D]
        entries.append(PromptEntry(str(meta.get("task", task)), prompt, path=path, **fields))
    visit(directory)
    if not entries:  # searched recursively
        raise ValueError(f"prompt library {directory} holds no .npy, T5X, PEFT prompts or run folders")
    return entries


def group_by_task(entries):
    """[PromptEntry] -> {task: [prompt runs]}, the input of similarity_matrix."""
    return {t: [e.prompt for e in entries if e.task == t] for t in dict.fromkeys(e.task for e in entries)}


# ---------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Task similarity and source retrieval over a prompt library "
                                                 "(SPoT §3).")
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="print source prompts by similarity to the target's prompt (§3.3)")
    rank.add_argument("--target", required=True, nargs="+",
                      help="target prompt: .npy, T5X prompt file, PEFT adapter, or a run folder (its task "
                           "embedding prompt_step<N>.npy); several = runs, averaged")
    rank.add_argument("--k", type=int, help="print the top k, alpha = TOP-k weights (default: all)")
    matrix = sub.add_parser("matrix", help="print the task similarity matrix of a library (Fig. 4)")
    for p in (rank, matrix):
        p.add_argument("--library", required=True,
                       help="directory of .npy, T5X and PEFT prompts (+ optional <stem>.json metadata) and "
                            "run folders, searched recursively")
        p.add_argument("--metric", default="per_token", choices=sorted(SIMILARITIES))
    args = parser.parse_args(argv)
    try:
        library = load_library(args.library)
        if args.command == "rank":
            import spot
            files = [spot.run_prompt_file(f, embedding=True) if Path(f).is_dir() and spot.is_run_folder(f)
                     else Path(f) for f in args.target]
            targets = {f: spot.load_prompt(f, what="target prompt") for f in files}
            widths = sorted({e.prompt.shape[1] for e in library})
            off = next(((f, t.shape[1]) for f, t in targets.items() if [t.shape[1]] != widths), None)
            if off:  # name the file whose width is off, not a library prompt
                raise ValueError(f"target prompt {off[0]} is {off[1]} wide, the library's prompts {widths}")
            own = {f.resolve() for f in files}  # a library that holds the target: not its own source
            left = [e for e in library if e.path is None or e.path.resolve() not in own]
            if len(left) < len(library):
                print(f"(left out of the library: the target itself, {', '.join(map(str, files))})")
            if not left:
                parser.exit(2, f"error: prompt library {args.library} holds only the target\n")
            ranking = rank_sources(list(targets.values()), left, args.metric)
            k = len(ranking) if args.k is None else args.k
            if k < 1:
                parser.exit(2, f"error: --k {k}: pick an integer 1 <= k <= {len(ranking)}\n")
            if k > len(ranking):  # --k 3 on a library of 2 sources: all of them
                print(f"(--k {k}, but the library holds {len(ranking)} sources: all of them)")
                k = len(ranking)
            top = ranking[:k]
            alphas = ([f"{a:.4f}" for a in top_k_weights(ranking, k)] if sum(s for _, s in top) > 0
                      else [""] * k)
            print(f"{'rank':>4} {args.metric:>14} {'alpha':>7}  task (what is known: run, step, score; file)")
            for r, ((e, sim), a) in enumerate(zip(top, alphas), 1):
                known = [f"{name}={getattr(e, name)}" for name in ("run", "step", "score")
                         if getattr(e, name) is not None]
                if e.path:  # relative to the library
                    known.append(str(e.path.relative_to(args.library) if e.path.is_relative_to(args.library)
                                     else e.path))
                print(f"{r:>4} {sim:>14.4f} {a:>7}  {e.task}" + (f" ({', '.join(known)})" if known else ""))
            return
        groups = group_by_task(library)
        print(f"{args.metric:>16} " + " ".join(f"{t[:10]:>10}" for t in groups))
        for task, row in zip(groups, similarity_matrix(groups, args.metric)):
            print(f"{task[:16]:>16} " + " ".join(f"{v:10.4f}" for v in row))
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
