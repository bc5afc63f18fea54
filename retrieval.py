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
    e1, e2 = _pair(e1, e2)
    u1, u2 = _unit(e1.mean(0), "first prompt's mean token"), _unit(e2.mean(0), "second prompt's mean token")
    return float(u1 @ u2)


def cosine_per_token(e1, e2):
    """SPoT §3.2 "Per-token Average Cosine Similarity": mean over all P1*P2 pairs of cos(e1_i, e2_j).
    Example: [[1,0],[0,1]] vs [[1,0]] -> (1 + 0) / 2 = 0.5. A prompt's similarity with itself averages
    its P^2 token pairs too, so it is below 1 unless all its tokens are parallel (Google's released
    prompts: 0.03-0.04, their tokens being nearly orthogonal)."""
    e1, e2 = _pair(e1, e2)
    # mean_ij <u_i, v_j> = <mean_i u_i, mean_j v_j> for unit tokens u, v: O(P D) instead of O(P^2 D).
    return float(_unit(e1, "first prompt").mean(0) @ _unit(e2, "second prompt").mean(0))


METRICS = {"per_token": cosine_per_token, "average_tokens": cosine_average_tokens}


def task_similarity(runs1, runs2, metric="per_token"):
    """Mean similarity over all run pairs (SPoT footnote 14: the 3 x 3 runs of two tasks)."""
    if not callable(metric) and metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; use one of {sorted(METRICS)}")
    sim = metric if callable(metric) else METRICS[metric]
    runs1, runs2 = _runs(runs1), _runs(runs2)  # §3.2: a task's embedding = its prompt after 10K steps
    return float(np.mean([sim(a, b) for a in runs1 for b in runs2]))


def similarity_matrix(runs_by_task, metric="per_token"):
    """{task: prompt or runs} -> [n, n] task_similarity matrix, rows in the dict's order (Figs. 4, 7)."""
    runs = list(runs_by_task.values())
    m = [[task_similarity(a, b, metric) for b in runs] for a in runs]
    return np.array(m, dtype=np.float64).reshape(len(runs), len(runs))


def _as_prompt(e, name="prompt"):
    e = np.asarray(e, dtype=np.float64)
    if e.ndim != 2 or 0 in e.shape:
        raise ValueError(f"{name} must be a non-empty 2-D prompt [P, D], got shape {e.shape}; "
                         "pass one prompt at a time (a list of runs goes to task_similarity)")
    if not np.isfinite(e).all():  # NaN similarities would scramble the ranking (NaN compares false)
        raise ValueError(f"{name} holds NaN or inf values (a diverged run?); use an earlier prompt")
    return e


def _unit(x, name):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError(f"{name} has a zero vector, so its cosine similarity is undefined")
    return x / norm


def _pair(e1, e2):
    e1, e2 = _as_prompt(e1, "first prompt"), _as_prompt(e2, "second prompt")
    if e1.shape[1] != e2.shape[1]:
        raise ValueError(f"prompts have different widths D ({e1.shape[1]} vs {e2.shape[1]}): task embeddings "
                         "are comparable only between prompts tuned on the same frozen model size")
    return e1, e2


def _runs(x):
    """One prompt [P, D], a list of runs, or stacked runs [R, P, D] -> list of [P, D] arrays."""
    if isinstance(x, (list, tuple)) and x and all(np.ndim(r) == 2 for r in x):
        return list(x)
    if np.ndim(x) in (2, 3) and np.size(x):
        return [x] if np.ndim(x) == 2 else list(x)
    raise ValueError(f"expected a non-empty 2-D prompt [P, D] or its runs [R, P, D], got shape {np.shape(x)}")


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
    if not library:
        raise ValueError("the prompt library is empty: save source prompts with save_to_library first")
    target = [_as_prompt(run, "the target prompt") for run in _runs(target)]
    _check_target_width(target, library, "the target prompt")
    sims = []
    for entry in library:  # §3.3: each of the 48 source prompts (16 tasks x 3 runs) is scored on its own
        try:
            sims.append(task_similarity(target, entry.prompt, metric))
        except ValueError as e:
            where = entry.path or "in memory"
            raise ValueError(f"source prompt of task {entry.task!r} ({where}): {e}") from None
    order = sorted(range(len(library)), key=lambda i: -sims[i])  # stable: ties keep library order
    return [(library[i], sims[i]) for i in order]


def _check_target_width(runs, library, what):
    """Blame a target of another width, rather than the first library prompt it is compared with."""
    widths = {np.shape(e.prompt)[-1] for e in library}
    if off := sorted({np.shape(run)[1] for run in runs} - widths):
        raise ValueError(f"{what} is {off[0]} wide but every library prompt is "
                         f"{' or '.join(map(str, sorted(widths)))} wide: prompts of one model size only")


def top_k(ranking, k):
    """The k highest-ranked entries: the source prompts BEST OF TOP-k tries (SPoT §3.3)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(ranking):
        raise ValueError(f"k={k!r} but the ranking holds {len(ranking)} prompts; "
                         f"pick an integer 1 <= k <= {len(ranking)}")
    return [entry for entry, _ in ranking[:k]]


def best_of_top_k(ranking, k, scores):
    """SPoT §3.3 BEST OF TOP-k: tune the target once from each of the top-k prompts, keep the best.
    `scores`: a callable PromptEntry -> target score, or the k scores in top_k order. -> (entry, score)."""
    return _best(top_k(ranking, k), scores)


def oracle(library, scores):
    """SPoT §3.3 ORACLE: brute-force best over every source prompt. -> (entry, score)."""
    return _best(list(library), scores)


def _best(entries, scores):
    scores = [scores(e) for e in entries] if callable(scores) else list(scores)
    if len(scores) != len(entries):
        raise ValueError(f"got {len(scores)} scores for {len(entries)} prompts; give one score per prompt")
    i = int(np.argmax(scores))
    return entries[i], float(scores[i])


def top_k_weights(ranking, k):
    """alpha_r = sim_r / sum_{l<=k} sim_l (SPoT §3.3, TOP-k WEIGHTED AVERAGE)."""
    sims = np.array([sim for _, sim in ranking[:len(top_k(ranking, k))]])
    if sims.sum() <= 0:
        raise ValueError(f"the top-{k} similarities sum to {sims.sum():.4g} <= 0: the weights are undefined")
    return sims / sims.sum()


def top_k_weighted_average(ranking, k):
    """SPoT §3.3 TOP-k WEIGHTED AVERAGE: one target init, sum_r alpha_r rho_r. -> prompt [P, D]."""
    prompts = [np.asarray(e.prompt, dtype=np.float64) for e in top_k(ranking, k)]
    if len(shapes := {p.shape for p in prompts}) > 1:
        raise ValueError(f"cannot average prompts of shapes {sorted(shapes)}; use equal [P, D]")
    return np.einsum("k,kPD->PD", top_k_weights(ranking, k), np.stack(prompts))


def top_k_mixture_tasks(ranking, k, target_task):
    """SPoT §3.3 TOP-k MULTI-TASK MIXTURE: the distinct source tasks among the top-k prompts, in rank
    order, plus the target task; their data are mixed examples-proportionally (data.mixture_rates)."""
    tasks = list(dict.fromkeys(e.task for e in top_k(ranking, k)))
    return tasks + [target_task] if target_task not in tasks else tasks


# ---------------------------------------------------------------- §3.1 transfer

def relative_error_reduction(score, baseline):
    """SPoT §3.1: 100 (s - b) / (100 - b), in %. Example: (97.0, 92.7) -> 58.9 (MNLI -> CB)."""
    score, baseline = np.asarray(score, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if np.any(baseline >= 100):
        raise ValueError("a baseline of 100 leaves no error to reduce; scores must be x100 and below 100")
    out = 100 * (score - baseline) / (100 - baseline)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------- prompt library on disk

def save_to_library(directory, prompt, task, run=0, step=None, model=None, score=None):
    """Write <task>-run<run>[-step<step>].npy plus a JSON sidecar with the metadata; returns the .npy path."""
    prompt = np.asarray(_as_prompt(prompt), dtype=np.float32)
    # numpy / jax scalars (np.int64 run, np.float32 score) as plain JSON numbers, checked before any write
    meta = json.loads(json.dumps({"task": task, "run": run, "step": step, "model": model, "score": score},
                                 default=lambda x: np.asarray(x).tolist()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task}-run{run}" + (f"-step{step}" if step is not None else ""))
    sidecar = directory / f"{stem}.json"
    if sidecar.exists() and (old := _read_json(sidecar).get("task")) != meta["task"]:  # "a/b" vs "a_b"
        raise ValueError(f"{sidecar} holds a prompt of task {old!r}, not {task!r}, under the same file name; "
                         "rename one of the tasks")
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
        if spot.is_run_folder(folder):
            entries.append(_run_entry(folder))
            return
        for path in sorted(folder.iterdir()):
            if path.is_dir() and ((path / spot.PEFT_CONFIG).is_file() or (path / spot.T5X_PROMPT).is_file()):
                stem = path.name
            elif path.is_dir():
                visit(path)
                continue
            elif path.is_file() and path.suffix == ".npy":
                stem = path.stem
            elif path.is_file() and path.name.endswith(spot.T5X_PROMPT):
                stem = path.name.removesuffix(spot.T5X_PROMPT).rstrip(".") or path.name
            else:
                continue  # not a prompt (README, notes/)
            sidecar = folder / f"{stem}.json"
            meta = _read_json(sidecar) if sidecar.exists() else {"task": stem}
            if not isinstance(meta, dict) or "task" not in meta:
                raise ValueError(f"{sidecar} has no 'task' field; write it with save_to_library")
            fields = {k: meta.get(k) for k in ("run", "step", "model", "score")}
            prompt = _as_prompt(spot.load_prompt(path), str(path))  # float64, non-empty
            entries.append(PromptEntry(meta["task"], prompt, path=path, **fields))
    visit(directory)
    if not entries:
        raise ValueError(f"prompt library {directory} holds no .npy prompts, T5X {spot.T5X_PROMPT} files, "
                         "PEFT adapter folders or run folders (searched recursively)")
    return entries


def _run_entry(folder):
    """A run folder's task embedding (spot.run_prompt_file) as a PromptEntry."""
    import spot
    path = spot.run_prompt_file(folder, embedding=True)
    sidecar = path.with_suffix(".json")
    meta = _read_json(sidecar) if sidecar.exists() else {}
    meta = meta if isinstance(meta, dict) else {}
    fields = {k: meta.get(k) for k in ("step", "model", "score")}
    prompt = _as_prompt(spot.load_prompt(path), str(path))
    return PromptEntry(str(meta.get("task") or folder.name), prompt, path=path, **fields)


def group_by_task(entries):
    """[PromptEntry] -> {task: [prompt runs]}, the input of similarity_matrix."""
    groups = {}
    for e in entries:
        groups.setdefault(e.task, []).append(e.prompt)
    return groups


# ---------------------------------------------------------------- CLI

def _print_ranking(ranking, k, metric, root=None):
    top = ranking[:len(top_k(ranking, k))]
    alphas = [f"{a:.4f}" for a in top_k_weights(ranking, k)] if sum(s for _, s in top) > 0 else [""] * k
    print(f"{'rank':>4} {metric:>14} {'alpha':>7}  task (what is known: run, step, score; file)")
    for r, ((e, sim), a) in enumerate(zip(top, alphas), 1):
        known = [f"{name}={getattr(e, name)}" for name in ("run", "step", "score")
                 if getattr(e, name) is not None]
        if e.path:
            known.append(str(e.path.relative_to(root) if root and e.path.is_relative_to(root) else e.path))
        print(f"{r:>4} {sim:>14.4f} {a:>7}  {e.task}" + (f" ({', '.join(known)})" if known else ""))


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
        p.add_argument("--metric", default="per_token", choices=sorted(METRICS))
    args = parser.parse_args(argv)
    try:
        library = load_library(args.library)
        if args.command == "rank":
            import spot
            files = [spot.run_prompt_file(f, embedding=True) if Path(f).is_dir() and spot.is_run_folder(f)
                     else Path(f) for f in args.target]
            targets = {f: spot.load_prompt(f, what="target prompt") for f in files}
            for f, t in targets.items():  # name the file whose width is off
                _check_target_width([t], library, f"target prompt {f}")
            own = {f.resolve() for f in files}  # a library that holds the target: not its own source
            left = [e for e in library if e.path is None or e.path.resolve() not in own]
            if len(left) < len(library):
                print(f"(left out of the library: the target itself, {', '.join(map(str, files))})")
            if not left:
                raise ValueError(f"prompt library {args.library} holds only the target")
            ranking = rank_sources(list(targets.values()), left, args.metric)
            k = len(ranking) if args.k is None else args.k
            if k > len(ranking) and k == int(k) > 0:  # --k 3 on a library of 2 sources: all of them
                print(f"(--k {k}, but the library holds {len(ranking)} sources: all of them)")
                k = len(ranking)
            _print_ranking(ranking, k, args.metric, Path(args.library))
            return
        groups = group_by_task(library)
        print(f"{args.metric:>16} " + " ".join(f"{t[:10]:>10}" for t in groups))
        for task, row in zip(groups, similarity_matrix(groups, args.metric)):
            print(f"{task[:16]:>16} " + " ".join(f"{v:10.4f}" for v in row))
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
