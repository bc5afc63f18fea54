"""retrieval.py: known answers, the released prompts as task embeddings, the library on disk and CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval as R

ROOT = Path(__file__).resolve().parents[1]
E2 = np.array([[1.0, 0.0], [0.0, 1.0]])


# ---------------------------------------------------------------- similarities: known answers

def test_cosine_average_tokens_known_answers():
    assert R.cosine_average_tokens(E2, [[1, 0]]) == pytest.approx(1 / np.sqrt(2))   # cos([.5,.5],[1,0])
    assert R.cosine_average_tokens(E2, [[1, 0], [1, 1]]) == pytest.approx(3 / np.sqrt(10))  # [.5,.5]·[1,.5]
    assert R.cosine_average_tokens([[3, 4]], [[4, 3]]) == pytest.approx(24 / 25)
    assert R.cosine_average_tokens([[3, 4]], [[-30, -40]]) == pytest.approx(-1.0)  # scale-free, signed


def test_cosine_per_token_known_answers():
    # pairs: cos(e1,e1)=1, cos(e1,[1,1])=1/√2, cos(e2,e1)=0, cos(e2,[1,1])=1/√2 -> mean (1 + √2) / 4
    assert R.cosine_per_token(E2, [[1, 0], [1, 1]]) == pytest.approx((1 + np.sqrt(2)) / 4)
    assert R.cosine_per_token(E2, [[1, 0]]) == pytest.approx(0.5)
    # the paper's per-token similarity of a prompt with itself averages all P^2 pairs, so it is not 1
    assert R.cosine_per_token(E2, E2) == pytest.approx(0.5)
    assert R.cosine_per_token([[1, 0], [2, 0]], [[5, 0]]) == pytest.approx(1.0)


def test_cosine_per_token_equals_the_double_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    loop = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x in a for y in b])
    assert R.cosine_per_token(a, b) == pytest.approx(loop, abs=1e-12)


def test_task_similarity_is_the_mean_over_run_pairs():
    runs1, runs2 = [E2, [[1, 0], [1, 0]]], [[[1, 0]], [[0, 1]]]
    # average_tokens: cos([.5,.5],[1,0]) = cos([.5,.5],[0,1]) = 1/√2;
    # cos([1,0],[1,0]) = 1, cos([1,0],[0,1]) = 0
    assert R.task_similarity(runs1, runs2, "average_tokens") == pytest.approx((2 / np.sqrt(2) + 1 + 0) / 4)
    assert R.task_similarity(E2, [[1, 0]], "per_token") == pytest.approx(0.5)  # single prompts work too
    m = R.similarity_matrix({"a": runs1, "b": runs2, "c": E2}, "average_tokens")
    assert m[0, 1] == pytest.approx((2 / np.sqrt(2) + 1) / 4)
    np.testing.assert_allclose(m, m.T)


# ---------------------------------------------------------------- retrieval: known answers

def _ranking(sims, prompts, tasks):
    return [(R.PromptEntry(t, np.asarray(p, float)), s) for s, p, t in zip(sims, prompts, tasks)]


def test_rank_sources_orders_by_similarity():
    library = [R.PromptEntry("x", np.array([[0.0, 1.0]])), R.PromptEntry("y", np.array([[1.0, 1.0]])),
               R.PromptEntry("z", np.array([[2.0, 0.0]]))]
    ranking = R.rank_sources(np.array([[1.0, 0.0]]), library, "average_tokens")
    assert [e.task for e, _ in ranking] == ["z", "y", "x"]
    np.testing.assert_allclose([s for _, s in ranking], [1.0, 1 / np.sqrt(2), 0.0], atol=1e-12)
    # several target runs: the similarity is averaged over them
    two = R.rank_sources([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])], library, "average_tokens")
    np.testing.assert_allclose(sorted(s for _, s in two), [0.5, 0.5, 1 / np.sqrt(2)], atol=1e-12)


def test_top_k_weights_and_weighted_average():
    ranking = _ranking([0.6, 0.3, 0.1], [[[1, 0]], [[0, 3]], [[9, 9]]], ["a", "b", "c"])
    np.testing.assert_allclose(R.top_k_weights(ranking, 2), [2 / 3, 1 / 3])
    np.testing.assert_allclose(R.top_k_weights(ranking, 3), [0.6, 0.3, 0.1])
    # alpha = (2/3, 1/3): 2/3 [1, 0] + 1/3 [0, 3] = [2/3, 1]
    np.testing.assert_allclose(R.top_k_weighted_average(ranking, 2), [[2 / 3, 1.0]])
    np.testing.assert_allclose(R.top_k_weighted_average(ranking, 1), [[1.0, 0.0]])


def test_best_of_top_k_oracle_and_mixture_tasks():
    ranking = _ranking([0.9, 0.8, 0.7, 0.6], [[[1, 0]]] * 4, ["mnli", "qnli", "mnli", "squad"])
    assert [e.task for e in R.top_k(ranking, 3)] == ["mnli", "qnli", "mnli"]
    entry, score = R.best_of_top_k(ranking, 3, [70.0, 75.0, 72.0])
    assert (entry.task, score) == ("qnli", 75.0)
    by_task = {"mnli": 80.0, "qnli": 75.0, "squad": 90.0}
    entry, score = R.best_of_top_k(ranking, 2, lambda e: by_task[e.task])
    assert (entry.task, score) == ("mnli", 80.0)
    assert R.oracle([e for e, _ in ranking], lambda e: by_task[e.task])[1] == 90.0
    assert R.top_k_mixture_tasks(ranking, 3, "rte") == ["mnli", "qnli", "rte"]
    assert R.top_k_mixture_tasks(ranking, 4, "qnli") == ["mnli", "qnli", "squad"]


# ---------------------------------------------------------------- §3.1 transfer

def test_relative_error_reduction_known_answers():
    assert R.relative_error_reduction(97.0, 92.7) == pytest.approx(58.904, abs=1e-3)  # MNLI -> CB, §3.1
    assert R.relative_error_reduction(50.0, 50.0) == 0.0
    np.testing.assert_allclose(R.relative_error_reduction([60.0, 40.0], 50.0), [20.0, -20.0])


# ---------------------------------------------------------------- the released prompts (real task embeddings)

def test_released_prompts_similarity_matrices(shared_data):
    library = R.load_library(shared_data / "prompt_tuning_release" / "t5_1_1_lm100k_base")
    assert [e.task for e in library] == ["mrpc", "rte", "sst2"] and library[0].prompt.shape == (100, 768)
    groups = R.group_by_task(library)
    for metric in ("average_tokens", "per_token"):
        m = R.similarity_matrix(groups, metric)
        rows = [f"{t:>5} " + " ".join(f"{v:.4f}" for v in row) for t, row in zip(groups, m)]
        print(f"\n{metric}\n" + "\n".join(rows))
        np.testing.assert_allclose(m, m.T, atol=1e-12)
        assert np.all(np.abs(m) <= 1 + 1e-12)
        # every released prompt retrieves itself first
        for e in library:
            assert R.rank_sources(e.prompt, library, metric)[0][0] is e
    np.testing.assert_allclose(np.diag(R.similarity_matrix(groups, "average_tokens")), 1.0, atol=1e-12)
    # per-token self-similarity = |mean unit token|^2 (< 1); the matrix is a Gram matrix, so PSD
    m = R.similarity_matrix(groups, "per_token")
    for e, d in zip(library, np.diag(m)):
        u = e.prompt / np.linalg.norm(e.prompt, axis=1, keepdims=True)
        assert d == pytest.approx(np.sum(u.mean(0) ** 2), rel=1e-9) and 0 < d < 1
    assert np.linalg.eigvalsh(m).min() > -1e-12


# ---------------------------------------------------------------- library on disk and CLI

def test_library_round_trip_with_metadata(tmp_path):
    rng = np.random.default_rng(2)
    prompts = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
    for run, p in enumerate(prompts):
        R.save_to_library(tmp_path, p, "glue/mnli", run=run, step=10_000, model="google/t5-base-lm-adapt",
                          score=80.0 + run)
    np.save(tmp_path / "rte.npy", prompts[0])  # a plain .npy, as Google released them
    library = R.load_library(tmp_path)
    assert len(library) == 4
    saved = [e for e in library if e.task == "glue/mnli"]
    assert [(e.run, e.step, e.model, e.score) for e in saved] == [
        (r, 10_000, "google/t5-base-lm-adapt", 80.0 + r) for r in range(3)]
    for e, p in zip(saved, prompts):
        np.testing.assert_array_equal(e.prompt, p)
    plain = [e for e in library if e.path.name == "rte.npy"][0]
    assert (plain.task, plain.run, plain.score) == ("rte", None, None)


def test_cli_rank_and_matrix(tmp_path):
    lib = tmp_path / "lib"
    R.save_to_library(lib, [[1.0, 0.0], [1.0, 0.1]], "near")
    R.save_to_library(lib, [[0.0, 1.0], [0.1, 1.0]], "far")
    R.save_to_library(lib, [[1.0, 1.0]], "middle")
    np.save(tmp_path / "target.npy", np.array([[1.0, 0.0]]))
    target = str(tmp_path / "target.npy")
    for metric in ("per_token", "average_tokens"):
        out = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", target,
                              "--library", str(lib), "--metric", metric, "--k", "2"],
                             capture_output=True, text=True, check=True).stdout
        rows = out.strip().splitlines()[1:]
        assert len(rows) == 2 and "near" in rows[0] and "middle" in rows[1], out
    out = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "matrix", "--library", str(lib),
                          "--metric", "average_tokens"], capture_output=True, text=True, check=True).stdout
    assert "1.0000" in out and "far" in out
    # --k past the library's size (the README's --k 3 on a smaller library) ranks all of it, and says so
    out = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", target, "--library",
                          str(lib), "--k", "9"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("(--k 9, but the library holds 3 sources: all of them)"), out
    assert len(out.splitlines()) == 5
    bad = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", target,
                          "--library", str(lib), "--k", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "pick an integer 1 <= k <= 3" in bad.stderr, bad.stderr


def test_library_holds_t5x_and_peft_prompts_beside_ours(tmp_path):
    """Prompts from the official code (T5X numpy checkpoints: a file, or its checkpoint_<step> folder) and
    PEFT adapter folders sit in one library with ours; a <stem>.json sidecar names any of them."""
    import spot
    import t5_model
    rng = np.random.default_rng(3)
    p = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]
    lib = tmp_path / "lib"
    R.save_to_library(lib, p[0], "mnli", run=0)
    with open(lib / "qnli.encoder.prompt.prompt.prompt", "wb") as f:  # as T5X: np.save on a file object
        np.save(f, p[1])
    (lib / "checkpoint_1110000").mkdir()
    with open(lib / "checkpoint_1110000" / "encoder.prompt.prompt.prompt", "wb") as f:
        np.save(f, p[2])
    (lib / "checkpoint_1110000.json").write_text('{"task": "rte", "step": 1110000}')
    spot.export_peft(p[3], t5_model.T5Config.tiny(d_model=3), lib / "sst2", "google/t5-base-lm-adapt")
    (lib / "notes").mkdir()  # neither a prompt nor an adapter: not a library entry
    (lib / "README.md").write_text("prompts for the SPoT runs\n")
    library = R.load_library(lib)
    assert [(e.task, e.step, e.path.name) for e in library] == [
        ("rte", 1110000, "checkpoint_1110000"), ("mnli", None, "mnli-run0.npy"),
        ("qnli", None, "qnli.encoder.prompt.prompt.prompt"), ("sst2", None, "sst2")]
    for e, want in zip(library, [p[2], p[0], p[1], p[3]]):
        np.testing.assert_array_equal(e.prompt, want)
    shutil.copytree(lib / "sst2", tmp_path / "target")
    rank = [sys.executable, str(ROOT / "retrieval.py"), "rank"]
    out = subprocess.run([*rank, "--target", str(tmp_path / "target"),
                          "--library", str(lib), "--metric", "average_tokens", "--k", "1"],
                         capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[1]
    assert "1.0000" in first and "sst2" in first, out  # its copy, found through PEFT's file
    out = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", str(lib / "sst2"),
                          "--library", str(lib), "--metric", "average_tokens"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("(left out of the library: the target itself") and " sst2 " not in out, out
    (lib / "lora").mkdir()
    (lib / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM"}')
    with pytest.raises(ValueError, match=r"lora is a PEFT LORA adapter, not prompt tuning"):
        R.load_library(lib)


def test_rank_blames_the_target_for_its_width(tmp_path):
    """Regression: `rank --target wide.npy --library lib/` said a library prompt had the wrong width."""
    lib = tmp_path / "lib"
    R.save_to_library(lib, E2, "a")
    R.save_to_library(lib, -E2, "b")
    np.save(tmp_path / "wide.npy", np.ones((2, 3)))
    wide = tmp_path / "wide.npy"
    bad = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", str(wide),
                          "--library", str(lib)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and f"target prompt {wide} is 3 wide" in bad.stderr, bad.stderr
    assert "a-run0" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors(tmp_path):
    """Bad library folders, and what no prompt file can be blamed for: a zero vector (a NaN similarity would
    scramble the ranking) and TOP-k weights of similarities summing to <= 0."""
    with pytest.raises(ValueError, match="zero vector"):
        R.cosine_per_token([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="holds no .npy"):
        R.load_library(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        R.load_library(tmp_path / "missing")
    with pytest.raises(ValueError, match="weights are undefined"):
        R.top_k_weights(_ranking([0.5, -0.5], [E2, E2], "ab"), 2)
    (tmp_path / "x.npy").write_bytes(b"")
    np.save(tmp_path / "x.npy", E2)
    (tmp_path / "x.json").write_text('{"run": 0}')
    with pytest.raises(ValueError, match="no 'task' field"):
        R.load_library(tmp_path)


def test_non_finite_prompts_are_refused_not_ranked(tmp_path):
    """Regression: a NaN prompt (a diverged run) got similarity NaN, and sorting with NaN keys put it
    second."""
    np.save(tmp_path / "diverged.npy", np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=r"diverged\.npy holds NaN"):
        R.load_library(tmp_path)


def test_library_files_with_numpy_metadata_and_damaged_files(tmp_path):
    """Regressions: np.int64 / np.float32 / jax metadata raised TypeError after the .npy was written (an
    orphan whose task became its file name); two task names with one file stem overwrote each other; a bad
    sidecar or .npy raised without naming the file."""
    import jax.numpy as jnp
    R.save_to_library(tmp_path, jnp.asarray(E2), "a/b", run=np.int64(1), step=np.int64(10),
                      score=np.float32(80.5))
    (entry,) = R.load_library(tmp_path)
    assert (entry.task, entry.run, entry.step, entry.score) == ("a/b", 1, 10, 80.5)
    with pytest.raises(ValueError, match=r"task 'a/b', not 'a_b'"):
        R.save_to_library(tmp_path, E2, "a_b", run=1, step=10)
    np.testing.assert_array_equal(R.load_library(tmp_path)[0].prompt, E2)
    (tmp_path / "a_b-run1-step10.json").write_text("{task: 1")
    with pytest.raises(ValueError, match=r"cannot read .*a_b-run1-step10\.json"):
        R.load_library(tmp_path)
    (tmp_path / "a_b-run1-step10.json").unlink()
    (tmp_path / "a_b-run1-step10.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"cannot read .*a_b-run1-step10\.npy"):
        R.load_library(tmp_path)


def test_lists_jax_arrays_and_ragged_inputs():
    """Regression: TOP-k weighted average of list prompts raised AttributeError."""
    import jax.numpy as jnp
    library = [R.PromptEntry("l", [[1.0, 0.0]]), R.PromptEntry("j", jnp.asarray([[0.0, 1.0]]))]
    ranking = R.rank_sources(jnp.asarray(E2), library, "average_tokens")
    assert [e.task for e, _ in ranking] == ["l", "j"]  # tie at 1/√2: library order
    mixed = _ranking([0.5, 0.5], [[[1, 0]], jnp.asarray([[0.0, 1.0]])], "ab")
    np.testing.assert_allclose(R.top_k_weighted_average(mixed, 2), [[0.5, 0.5]])


def test_library_is_searched_recursively_and_a_run_folder_gives_its_task_embedding(tmp_path):
    """Regression: `rank --library runs/` was refused (no prompt at its top) and a run folder was no prompt.
    A run folder (spot.py train --out) is one entry, its prompt_step<N>.npy (the task embedding, §3.2) under
    the task of its sidecar; folders are searched recursively; the printout names only what is known."""
    runs = tmp_path / "runs"
    for name, task, prompt in (("cb", "cb", E2), ("glue", "GLUE", -E2)):
        (runs / name).mkdir(parents=True)
        np.save(runs / name / "prompt.npy", np.zeros((2, 2)))            # the best checkpoint: not ranked
        np.save(runs / name / "prompt_step10.npy", prompt)
        (runs / name / "prompt_step10.json").write_text(json.dumps({"task": task, "step": 10, "score": None}))
    R.save_to_library(runs / "more" / "deeper", E2[::-1], "mnli", run=0)
    library = R.load_library(runs)
    assert [(e.task, e.step, e.path.relative_to(runs).as_posix()) for e in library] == [
        ("cb", 10, "cb/prompt_step10.npy"), ("GLUE", 10, "glue/prompt_step10.npy"),
        ("mnli", None, "more/deeper/mnli-run0.npy")]
    np.testing.assert_array_equal(library[1].prompt, -E2)
    out = subprocess.run([sys.executable, str(ROOT / "retrieval.py"), "rank", "--target", str(runs / "cb"),
                          "--library", str(runs), "--metric", "average_tokens"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == f"(left out of the library: the target itself, {runs / 'cb' / 'prompt_step10.npy'})"
    assert lines[2].endswith("mnli (run=0, more/deeper/mnli-run0.npy)") and "None" not in out, out
    assert lines[3].endswith("GLUE (step=10, glue/prompt_step10.npy)"), out
