"""Every experiment's --tiny run and the quickstart, in-process (experiments/*.py main(argv)).

The results follow paper_numbers.RESULTS_SCHEMA and test_paper_numbers.compare accepts them; the retrieval
logic holds on the numbers; the quickstart's retrieval and transfer effect hold. ~3 min on 2 cores (compiles
are shared across the scripts)."""
import dataclasses
import json
import re
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

import data
import retrieval
import spot
import t5_model
from conftest import ORACLE_INSTALL
from experiments import (
    common,
    figure1_model_sizes,
    paper_numbers,
    quickstart,
    table1_source_mixtures,
    table3_retrieval,
    table6_transferability,
)
from tests.test_paper_numbers import compare
from tests.test_released_prompts import run_uninstalled


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def run_tiny(module, out, *extra):
    t0 = time.perf_counter()
    result = module.main(["--tiny", "--out", str(out), *extra])
    print(f"{module.__name__} --tiny: {time.perf_counter() - t0:.1f} s")
    name = module.__name__.split(".")[-1]
    assert name in paper_numbers.EXPERIMENT_COMMANDS
    assert not (out / f"{name}.json").exists()     # a tiny run never overwrites a real run's results
    saved = json.loads((out / "tiny" / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(result))  # what main returns is what it wrote
    assert set(saved) == {"experiment", "config", "results", "summary"} and saved["experiment"] == name
    assert saved["config"]["tiny"] is True
    for record in saved["results"]:
        assert {"task", "seed", "source", "method", "score", "metrics"} <= set(record), record
        assert record["score"] is None or 0 <= record["score"] <= 100, record
    for row, cell in saved["summary"].items():
        assert {"mean", "std", "paper"} <= set(cell), row
    compare(saved)  # the loader of tests/test_paper_numbers.py reads it without error
    return saved


def test_table1_tiny(out, capsys):
    res = run_tiny(table1_source_mixtures, out, "--seeds", "2")
    # A GPU run on the CPU does not go unseen.
    assert f"backend {jax.default_backend()}" in capsys.readouterr().out
    rows, benchmarks = table1_source_mixtures.TINY_ROWS, table1_source_mixtures.TINY_BENCHMARKS
    assert list(res["summary"]) == [f"{r}/{b}" for r in rows for b in benchmarks]
    assert len(res["results"]) == len(rows) * 2 * sum(map(len, benchmarks.values()))
    compared, _ = compare(res)
    assert compared == len(res["summary"])  # every row is named as in paper_numbers.paper_rows
    for row in res["summary"]:  # each summary mean is the mean over seeds of the benchmark averages
        r, b = row.split("/")
        per_seed = [np.mean([x["score"] for x in res["results"] if x["method"] == r and x["benchmark"] == b
                             and x["seed"] == s]) for s in (0, 1)]
        np.testing.assert_allclose(res["summary"][row]["mean"], np.mean(per_seed))
    assert {x["source"] for x in res["results"] if x["method"] == "PromptTuning"} == {None}


def test_figure1_tiny(out, capsys):
    res = run_tiny(figure1_model_sizes, out)
    printed = capsys.readouterr().out               # one seed: no "± 0.0 over 1 seeds"
    assert "ours (1 seed: no spread) vs paper" in printed and "over 1 seeds" not in printed
    assert "± 0.0 " not in printed.split("vs paper")[1].split("paper")[0]
    methods = ["PromptTuning", "SPoT", "ModelTuning", "Multi-task ModelTuning"]
    assert list(res["summary"]) == [f"{m}/tiny" for m in methods]
    paper = paper_numbers.paper_rows("figure1_model_sizes")
    assert all(f"{m}/{size}" in paper for m in methods for size in paper_numbers.SIZES)  # same row names
    assert len(res["results"]) == len(methods) * len(figure1_model_sizes.TINY_SUPERGLUE)


def test_model_tuning_step_trains_every_weight():
    """The Figure 1 baseline path: its jaxpr returns one updated array per weight (and no prompt)."""
    from tests.test_spot import CFG, EVAL_BATCH
    frozen = t5_model.init_params(jax.random.key(0), CFG)
    opt_state = spot.make_optimizer(figure1_model_sizes.MODEL_TUNING).init(frozen)
    jaxpr = jax.make_jaxpr(figure1_model_sizes.model_tuning_step, static_argnums=(4, 5))(
        frozen, opt_state, EVAL_BATCH, spot.dropout_key(0, 0), CFG, figure1_model_sizes.MODEL_TUNING)
    shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(frozen)]
    assert [tuple(a.shape) for a in jaxpr.out_avals[:len(shapes)]] == shapes
    assert len(jaxpr.out_avals) == len(shapes) + len(jax.tree_util.tree_leaves(opt_state)) + 1


def test_table6_then_table3_tiny(out):
    t6 = run_tiny(table6_transferability, out, "--seeds", "2")
    sources, targets = table6_transferability.TINY_SOURCES, table6_transferability.TINY_TARGETS
    cells = {row: c["mean"] for row, c in t6["summary"].items()}
    for s in sources:
        for t in targets:
            base = min(cells[f"BASELINE/{t}"], 99.9)
            expected = retrieval.relative_error_reduction(cells[f"{s}/{t}"], base)
            np.testing.assert_allclose(cells[f"RER/{s}/{t}"], expected)
    assert (out / "tiny" / "figure3_transfer_heatmap.png").stat().st_size > 0
    assert not list(out.glob("*.png"))

    t3 = run_tiny(table3_retrieval, out)  # reuses table 6's runs in the same --out
    assert t3["config"]["library_size"] == len(sources) * 2
    by = {}
    for r in t3["results"]:
        by.setdefault((r["task"], r["seed"]), {})[r["method"]] = r["score"]
    assert set(by) == {(t, s) for t in targets for s in (0, 1)}
    for key, row in by.items():  # BEST OF TOP-k can only grow with k, up to the ORACLE at k = all prompts
        for metric in retrieval.SIMILARITIES:
            ks = [k for k in table3_retrieval.KS if f"{metric}/best_of_top_k/{k}" in row]
            best = [row[f"{metric}/best_of_top_k/{k}"] for k in ks]
            assert best == sorted(best) and max(best) <= row["ORACLE"], (key, metric, best)
            assert best[-1] == row["ORACLE"]  # k = 6 = every prompt of the tiny library
    np.testing.assert_allclose(t3["summary"]["BASELINE"]["mean"],
                               np.mean([cells[f"BASELINE/{t}"] for t in targets]))
    assert t3["summary"]["ORACLE"]["mean"] >= t3["summary"]["per_token/best_of_top_k/1"]["mean"]
    for fig in ("figure4_task_similarity", "figure5_similarity_vs_transfer",
                "figure8_similarity_vs_transfer"):
        assert (out / "tiny" / f"{fig}.png").stat().st_size > 0


def test_table3_without_table6_runs_names_the_command(tmp_path):
    with pytest.raises(SystemExit, match="table6_transferability.py"):
        table3_retrieval.main(["--out", str(tmp_path)])


def test_token_task_known_answer():
    td = common.token_task("t", 7, ([100, 101], [200, 201]), (10, 11), [50], n_train=6, n_val=2, seed=0,
                           width=10)
    x, y = td.train.inputs, td.train.targets
    assert x.shape == (6, 10) and (x[:, 0] == 7).all() and (x[:, 7] == 1).all() and (x[:, 8:] == 0).all()
    for row, target in zip(x, y):  # 2 trigger words of the class named by the target, the rest filler 50
        c = [10, 11].index(target[0])
        assert target[1] == 1 and set(row[1:7]) - {50} <= set([[100, 101], [200, 201]][c])
        assert np.isin(row[1:7], [[100, 101], [200, 201]][c]).sum() == 2
    assert td.label_ids == [[10], [11]]


def test_quickstart_retrieves_the_related_source_and_transfers():
    res = quickstart.main([])
    print(f"quickstart: {res['seconds']:.0f} s")
    assert all(v > 80 for v in res["source_scores"].values()), res["source_scores"]  # source prompts learned
    for metric in retrieval.SIMILARITIES:
        assert res["picked"][metric] == ["sentiment"] * 3, res["picked"]
    gain = res["gain"]
    assert gain["sentiment"] > 20, gain
    assert all(gain["sentiment"] > g + 20 for n, g in gain.items() if n != "sentiment"), gain


def test_bench_prompt_step_runs_without_peft(tmp_path):
    """The benchmark is a script, not a timed test: this only checks that it runs and reports what it
    promises."""
    from experiments import bench_prompt_step
    bench_prompt_step.main(["--no-peft", "--shapes", "small", "--rounds", "1", "--steps", "1", "--batch-size",
                            "1", "--json", str(tmp_path / "bench.json")])
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["shape"] == "small" and row["arm"] == "ours" and row["ratio_vs_peft"] is None
    assert row["s_per_step"] > 0 and row["compile_s"] > 0
    assert row["tokens_per_s"] == 1 * (100 + 128 + 8) / row["s_per_step"]


def test_bench_peft_arm_times_random_and_given_batches(shared_data):
    """The PEFT arm (bench_peft_arm.py under --peft-python) on a tiny shape: the random batches of the
    synthetic rounds, then our pipeline's token ids collated as PEFT pads them."""
    for name in ("torch", "transformers", "peft"):
        pytest.importorskip(name, reason=f"the PEFT arm needs {name}: {ORACLE_INSTALL}")
    from experiments import bench_prompt_step as B
    args = types.SimpleNamespace(peft_python=sys.executable, threads=1, vocab=shared_data / "t5_spiece.model")
    cfg = t5_model.T5Config.tiny()
    times, versions = B.run_peft(args, cfg, "--batch", "2", "--enc-len", "8", "--dec-len", "4",
                                 "--steps", "2")
    assert len(times) == 2 and all(t > 0 for t in times)
    assert set(versions) == {"torch", "transformers", "peft"}
    rows = [([[5, 6, 1], [7, 1]], [[8, 1], [9, 1]])] * 3          # (input ids, target ids) of 3 steps
    times, _ = B.run_peft_real(args, cfg, rows)
    assert len(times) == 2


def test_analytic_flops_known_answer():
    """One encoder and one decoder layer, d_model 2, 1 head of 1, d_ff 3, vocabulary 5; 2 rows of 4 encoder
    and 3 decoder positions. Multiply-adds per row: encoder 4 * (4*2 + 3*2*3) projections + 2*4*4 attention;
    decoder 3 * (6*2 + 18) + 4 * 2*2 projections + 2*3*(3+4) attention; output 3 * 2*5."""
    cfg = t5_model.T5Config(vocab_size=5, d_model=2, d_kv=1, d_ff=3, num_heads=1, num_layers=1,
                            num_decoder_layers=1)
    from experiments import bench_prompt_step as B
    proj, attn = 2 * (4 * 26 + 3 * 30 + 16 + 30), 2 * (32 + 42)
    assert B.analytic_flops(cfg, 2, 4, 3) == {"forward": 2 * (proj + attn),
                                             "prompt_step": 2 * (proj + attn) + 2 * proj + 4 * attn}


def test_no_script_default_or_readme_command_reads_a_shared_folder_beside_the_clone():
    """A user's clone has no ../shared: the README's commands and the scripts' defaults name the fetch cache
    (python3 data.py fetch) or tfds instead."""
    root = Path(common.__file__).resolve().parents[1]
    for path in [root / "README.md", *sorted((root / "experiments").glob("*.py"))]:
        hits = [f"{path.name}:{i}: {line}" for i, line in enumerate(path.read_text().splitlines(), 1)
                if "shared/" in line]
        assert not hits, hits


def test_ci_runs_the_readme_test_command_with_the_cpu_torch_index_and_python3_throughout():
    """.ci/run is the README's test command; it installs the oracles from PyTorch's CPU index (plain PyPI
    serves the CUDA build); every command in the README and the scripts' docstrings says python3."""
    root = Path(common.__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("Run the tests")[1].split("```bash\n")[1].split("```")[0]
    command = " ".join(block.replace("\\\n", " ").split())
    ci = (root / ".ci" / "run").read_text()
    assert command in " ".join(ci.replace("\\\n", " ").split())
    assert "'.[test,oracle]' --extra-index-url https://download.pytorch.org/whl/cpu" in command
    for path in [root / "README.md", *sorted((root / "experiments").glob("*.py"))]:
        bare = [line for line in path.read_text().splitlines()
                if re.search(r"(^|[\s`($])python [\w./-]+\.py", line)]
        assert not bare, (path.name, bare)


SCRIPTS = sorted(p.name for p in (Path(common.__file__).parent).glob("*.py") if "__main__" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_from_a_clone_that_was_not_installed(script, tmp_path):
    """`python experiments/<script> --help` from another folder with the packages installed but not this
    repository: each script puts the repository root on sys.path before it imports from it."""
    assert run_uninstalled(tmp_path, "-c", "import data").returncode == 1     # the repository is hidden
    out = run_uninstalled(tmp_path, str(Path(common.__file__).parent / script), "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]


def test_readme_spot_step_by_step_runs_as_written(shared_data, tmp_path, monkeypatch, capsys):
    """The README's "SPoT step by step" commands, run as written but on the random tiny T5: --model tiny, a
    few steps, --data with the fetch cache's files; GLUE is RTE + MRPC and MNLI is SST-2 (the cache has no
    MNLI). Run folders are the prompts; the library runs/ is searched recursively."""
    import shlex

    import data
    readme = (Path(common.__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## SPoT step by step")[1].split("```bash\n")[1].split("```")[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("python3 ")]
    assert [c[1] for c in commands] == ["spot.py"] * 3 + ["retrieval.py"] + ["spot.py"] * 2
    monkeypatch.setitem(data.MIXTURES, "GLUE", ("rte", "mrpc"))
    monkeypatch.chdir(tmp_path)
    subs = {("--model", "google/t5-base-lm-adapt"): "tiny", ("--task", "mnli"): "sst2"}
    tiny = ["--eval_limit=8", "--eval_batch_size=8", "--max_input_len=48", "--length=5"]
    tiny_train = ["--steps", "4", "--batch_size=4", "--eval_every=2", "--embedding_step=2"]
    for script, *argv in (c[1:] for c in commands):
        argv = [subs.get((before, a), a) for before, a in zip(["", *argv], argv)]
        if script == "retrieval.py":
            retrieval.main(argv)
            continue
        folder = "superglue" if argv[argv.index("--task") + 1] == "cb" else "glue"
        spot.main([*argv, "--data", str(shared_data / folder), *tiny,
                   *(tiny_train if argv[0] == "train" else [])])
    out = capsys.readouterr().out
    ranking = out[out.index("(left out of the library: the target itself"):].splitlines()
    assert ranking[1] == "(--k 3, but the library holds 2 sources: all of them)"
    assert ranking[2].split()[:2] == ["rank", "per_token"]
    assert sorted(line.split()[3] for line in ranking[3:5]) == ["GLUE", "sst2"], out     # cb: the target
    scores = json.loads(Path("runs/glue-cb/eval.json").read_text())
    assert scores["task"] == "cb" and scores["examples"] == 8 and 0 <= scores["accuracy"] <= 100
    source = json.loads(Path("runs/glue-cb/prompt.json").read_text())["prompt_config"]
    assert source["init"] == "file" and source["source"] == "runs/glue"


def test_run_main_turns_user_errors_into_one_line_and_debug_shows_the_traceback(monkeypatch):
    """Every script ends in common.run_main(main): a missing file, offline or a bad value is one line on
    stderr (table6 offline printed 110 lines); --debug or SPOT_DEBUG=1 raises it; a bug still raises."""
    def main(argv):
        assert "--debug" not in argv                    # run_main takes it: the scripts' parsers never see it
        raise FileNotFoundError("no file x:\n  pass --data DIR")
    monkeypatch.setattr(sys, "argv", ["table6_transferability.py", "--tiny"])
    monkeypatch.delenv("SPOT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == "error: no file x: pass --data DIR (traceback: --debug)"
    monkeypatch.setattr(sys, "argv", ["table6_transferability.py", "--tiny", "--debug"])
    with pytest.raises(FileNotFoundError):
        common.run_main(main)
    monkeypatch.setattr(sys, "argv", ["table6_transferability.py"])
    monkeypatch.setenv("SPOT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        common.run_main(main)
    monkeypatch.delenv("SPOT_DEBUG")
    with pytest.raises(ZeroDivisionError):                  # not the user's: a traceback
        common.run_main(lambda argv: 1 / 0)


def test_scripts_take_config_fields_as_flags_with_a_value_or_equals_and_dashes():
    args = common.parse_args("doc", ["--tiny", "--batch_size", "8", "--eval-every=3", "--learning-rate",
                                     "0.1"])
    assert (args.train.batch_size, args.train.eval_every, args.train.optimizer.learning_rate) == (8, 3, 0.1)
    assert Path(args.out).name == "tiny" and args.runs == Path(args.out) / "runs"
    with pytest.raises(SystemExit):
        common.parse_args("doc", ["--tiny", "--no_such_field", "1"])


def test_grid_split_over_two_workers_one_killed_loses_no_run_and_does_none_twice(tmp_path):
    """Two workers run table6 --tiny on one --out at once; one is killed (SIGKILL) mid-run. The other claims
    what is free, waits for what is held, takes over the dead worker's runs (resumed from their checkpoints),
    and writes the table; a rerun trains nothing and writes the same table. No run is trained by two workers
    at once (the run.lock), and every run's history is one pass of steps (no step twice)."""
    import signal
    import subprocess
    cmd = [sys.executable, "experiments/table6_transferability.py", "--tiny", "--out", str(tmp_path),
           "--steps", "60", "--checkpoint_every=4", "--eval_every=20", "--runs-per-step", "4"]
    root = Path(__file__).resolve().parents[1]
    a = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in a.stdout:                                        # a has claimed its first runs
        if line.startswith("training "):
            break
    b = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "tiny" / "runs" / "table6"
    claimed_by_a = line.split(": ")[1].split()
    deadline = time.time() + 300
    while not any((runs / n / "checkpoint.npz").exists() for n in claimed_by_a):   # a is mid-run
        assert time.time() < deadline and a.poll() is None
        time.sleep(0.05)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=60)
    out_b, _ = b.communicate(timeout=600)
    assert b.returncode == 0, out_b
    assert "wrote" in out_b and (tmp_path / "tiny" / "table6_transferability.json").exists(), out_b
    n_runs = len(table6_transferability.TINY_SOURCES) * (1 + len(table6_transferability.TINY_TARGETS)) + \
        len(table6_transferability.TINY_TARGETS)
    folders = [d for d in runs.iterdir() if d.is_dir()]
    assert len(folders) == n_runs and all(spot.finished(d) for d in folders)
    taken_over = [n for n in claimed_by_a if n in out_b]
    assert taken_over, out_b                                     # b finished what a held when it died
    for d in folders:
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == sorted(set(steps)), (d.name, steps)
    first = json.loads((tmp_path / "tiny" / "table6_transferability.json").read_text())
    rerun = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "training" not in rerun.stdout, rerun.stdout
    assert json.loads((tmp_path / "tiny" / "table6_transferability.json").read_text()) == first


def test_grid_worker_without_wait_exits_saying_what_others_hold(tmp_path, capsys):
    """--no-wait: runs whose folder another worker holds are left to it, the rest trained; run_grid returns
    None (the script exits 0) naming what is left; once those are done a call assembles every result."""
    cfg, frozen = common.frozen_model("tiny", True)
    td = common.synthetic_task("RTE")
    tc = spot.TrainConfig(steps=2, batch_size=4, eval_every=2, eval_limit=4, eval_method="rank")

    def make(seed):
        start = common.initial_prompt(frozen, types.SimpleNamespace(tiny=True), seed, "RTE")
        return lambda out: spot.Run(start, dataclasses.replace(tc, seed=seed),
                                    lambda k: data.batches(td.train, tc.batch_size, seed, k),
                                    td.score(frozen, cfg), out)
    grid = [common.GridRun(f"run{s}", make(s)) for s in (0, 1)]
    args = types.SimpleNamespace(tiny=True, runs_per_step=8, mesh=None, log=None, no_wait=True)
    with spot.own_folder(tmp_path / "run1"):                      # another worker holds run1
        assert common.run_grid(args, grid, tmp_path, frozen, cfg) is None
    out = capsys.readouterr().out
    assert "training 1 runs together: run0" in out
    assert "1 of 2 runs left: 1 held by other workers (run1: pid" in out
    assert spot.finished(tmp_path / "run0") and not spot.finished(tmp_path / "run1")
    done = common.run_grid(args, grid, tmp_path, frozen, cfg)
    assert set(done) == {"run0", "run1"} and all(r["prompt"].shape == (8, cfg.d_model) for r in done.values())
