"""experiments/released_prompts.py: the taskless input format, batching, the --tiny run, and (slow, with the
Base weights) Google's released prompts within 0.5 points of their release notes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import t5_model
from experiments import released_prompts as rp
from experiments.paper_numbers import RELEASED_PROMPTS

# First validation example of each task in ../shared/data/glue, written out by hand in the official taskless
# format (T5 glue preprocessor without its first word, the task name; tfds label_classes for the targets).
# The SST-2 sentence keeps the tsv's trailing space; the MRPC tsv keeps a raw leading quote (QUOTE_NONE).
FIRST_TASKLESS = {
    "sst2": {"inputs": "sentence: it 's a charming and often affecting journey . ", "targets": "positive"},
    "mrpc": {"inputs": "sentence1: He said the foodservice pie business doesn't fit the company's "
                       "long-term growth strategy. sentence2: \"The foodservice pie business does not fit "
                       "our long-term growth strategy.",
             "targets": "equivalent"},
    "rte": {"inputs": "sentence1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung "
                      "cancer at age 44, according to the Christopher Reeve Foundation. sentence2: "
                      "Christopher Reeve had an accident.",
            "targets": "not_entailment"},
}


@pytest.mark.parametrize("task", rp.TASKS)
def test_taskless_format_of_first_dev_example(shared_data, task):
    example = data.load_examples(task, "validation", shared_data / "glue")[0]
    assert rp.taskless_text(task, example) == FIRST_TASKLESS[task]


def test_label_minus_one_becomes_unk():
    """t5 preprocessors.glue: an unlabeled example (label -1) gets the target "<unk>"."""
    ex = {"sentence1": "A man sleeps.", "sentence2": "A person rests.", "label": -1, "idx": 0}
    assert rp.taskless_text("rte", ex) == {"inputs": "sentence1: A man sleeps. sentence2: A person rests.",
                                           "targets": "<unk>"}


def test_load_prompts_checks_width(tmp_path):
    np.save(tmp_path / "sst2.npy", np.zeros((100, 512), np.float32))
    with pytest.raises(ValueError, match=r"sst2.npy has shape \(100, 512\): width 512 .* d_model 768"):
        rp.load_prompts(tmp_path, ("sst2",), 768)
    with pytest.raises(FileNotFoundError, match="rte.npy"):
        rp.load_prompts(tmp_path, ("rte",), 768)


def test_the_release_comes_from_the_cache_and_offline_names_the_way_out(shared_data, tmp_path, monkeypatch):
    """The default --prompts: the cache (data.fetch, from the files' public home); offline, one line naming
    the file it could not reach and the mirror variable."""
    monkeypatch.setenv("SPOT_DATA", str(shared_data))
    assert rp.release_folder(("sst2", "rte")) == shared_data / rp.RELEASE
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("SPOT_DATA_MIRROR", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("SPOT_DATA", str(tmp_path / "cache"))
    with pytest.raises(data.FetchError, match=f"could not reach .*/{rp.RELEASE}/sst2.npy .*SPOT_DATA_MIRROR"):
        rp.release_folder(("sst2",))


def test_tiny_run_end_to_end(shared_data, tmp_path, capsys):
    record = rp.main(["--tiny", "--data", str(shared_data / "glue"), "--out", str(tmp_path)])
    assert "meaningless" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "tiny" / "released_prompts.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["experiment"] == "released_prompts"
    assert on_disk["config"]["tiny"] is True and on_disk["config"]["input_format"] == "taskless"
    assert on_disk["config"]["model_config"]["d_model"] == 768  # the released prompts' width
    assert [r["task"] for r in on_disk["results"]] == list(rp.TASKS)
    for r in on_disk["results"]:
        assert r["n_examples"] == 8
        assert r["first_input"] == FIRST_TASKLESS[r["task"]]["inputs"]
        assert r["released"] == RELEASED_PROMPTS[r["task"]]
        assert set(r["released"]) <= set(r["metrics"])
        assert all(0.0 <= v <= 100.0 for v in r["metrics"].values())
        np.testing.assert_allclose(r["score"], np.mean([v for k, v in r["metrics"].items() if k != "score"]))
        assert 0 <= r["invalid_predictions"] <= 8
    assert set(on_disk["summary"]) == {"sst2/accuracy", "mrpc/f1", "mrpc/accuracy", "rte/accuracy"}


def _save_hf_checkpoint(folder, cfg, params):
    """Write params as a Hugging Face T5 folder (config.json + model.safetensors): torch Linear is
    [out, in]."""
    from safetensors.numpy import save_file
    flat = {}
    for name, (path, layer) in t5_model.hf_name_map(cfg).items():
        w = params
        for key in path.split("/"):
            w = w[key]
        w = np.asarray(w if layer is None else w[layer])
        if name != "shared.weight" and not name.endswith("layer_norm.weight"):
            w = (w.reshape(-1, w.shape[-1]) if path.endswith("out/kernel") else w.reshape(w.shape[0], -1)).T
        flat[name] = np.ascontiguousarray(w)
    save_file(flat, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
        "vocab_size": cfg.vocab_size, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}))


def run_uninstalled(cwd, *args):
    """python -S <args> in cwd, with the packages installed but not this repository: -S skips site's .pth
    files, so pip install -e's import hook for data, t5_model ... is gone, as in a clone that was never
    installed; the site directories come back through PYTHONPATH."""
    site_dirs = [p for p in sys.path if p and Path(p).is_dir() and not (Path(p) / "data.py").is_file()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site_dirs)}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


SCRIPT = str(Path(rp.__file__).resolve())


def test_runs_as_a_script_from_a_clone_that_was_not_installed(shared_data, tmp_path):
    """`python3 experiments/released_prompts.py --tiny` from another folder: the script puts the repository
    root on sys.path before it imports data."""
    hidden = run_uninstalled(tmp_path, "-c", "import data")
    assert hidden.returncode == 1 and "No module named 'data'" in hidden.stderr   # the repository is hidden
    release = shared_data / "prompt_tuning_release" / "t5_1_1_lm100k_base"
    out = run_uninstalled(tmp_path, SCRIPT, "--tiny", "--data", str(shared_data / "glue"),
                           "--prompts", str(release), "--vocab", str(shared_data / "t5_spiece.model"),
                           "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "tiny" / "released_prompts.json").read_text())
    assert saved["config"]["tiny"] is True


def test_bad_input_is_one_line_not_a_traceback(shared_data, tmp_path):
    """--vocab that is no SentencePiece model, --model whose config.json has a wrong value: exit 1 with one
    line naming the file."""
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"d_model": 16, "d_kv": 8, "d_ff": 32,
                                                                "num_heads": 2}))   # no num_layers
    release = str(shared_data / "prompt_tuning_release" / "t5_1_1_lm100k_base")
    for args, names in [(["--tiny", "--vocab", str(tmp_path / "x.npy")], "x.npy is not a SentencePiece"),
                        (["--model", str(tmp_path / "model"), "--prompts", release,
                          "--vocab", str(shared_data / "t5_spiece.model")], "config.json: no num_layers")]:
        out = run_uninstalled(tmp_path, SCRIPT, *args, "--data", str(shared_data / "glue"),
                               "--out", str(tmp_path / "out"))
        assert out.returncode == 1 and out.stderr.startswith("error: ") and names in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert out.stderr.rstrip().endswith("(traceback: --debug)")
    debug = run_uninstalled(tmp_path, SCRIPT, "--tiny", "--vocab", str(tmp_path / "x.npy"), "--debug",
                            "--data", str(shared_data / "glue"), "--out", str(tmp_path / "out"))
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "x.npy is not a SentencePiece" in debug.stderr


def test_checkpoint_path_runs_on_a_local_folder(shared_data, tmp_path):
    """The non-tiny path (setup: prompts, vocab, load_checkpoint) on a tiny random checkpoint folder."""
    import jax
    cfg = t5_model.T5Config.tiny()
    shapes = jax.eval_shape(lambda key: t5_model.init_params(key, cfg), jax.random.key(1))
    rng = np.random.default_rng(1)  # numpy weights: skips compiling init_params for a throwaway checkpoint
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)
    (tmp_path / "model").mkdir()
    _save_hf_checkpoint(tmp_path / "model", cfg, params)
    (tmp_path / "prompts").mkdir()
    np.save(tmp_path / "prompts" / "rte.npy", np.ones((100, cfg.d_model), np.float32))
    record = rp.main(["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts"),
                      "--vocab", str(shared_data / "t5_spiece.model"), "--data", str(shared_data / "glue"),
                      "--tasks", "rte", "--limit", "3", "--batch_size", "3", "--out", str(tmp_path)])
    assert record["config"]["tiny"] is False and record["config"]["model_config"]["d_model"] == cfg.d_model
    [r] = record["results"]
    assert r["task"] == "rte" and r["n_examples"] == 3 and r["first_input"] == FIRST_TASKLESS["rte"]["inputs"]


# ----------------------------------------------------------------------------------------- real weights
COMMAND = ('python3 experiments/released_prompts.py --model google/t5-base-lm-adapt '
           '--data "$(python3 data.py fetch glue)/glue"')


def _base_checkpoint():
    """$SPOT_T5_BASE, else google/t5-base-lm-adapt from the Hugging Face cache (never the network), else
    None."""
    if os.environ.get("SPOT_T5_BASE"):
        return Path(os.environ["SPOT_T5_BASE"])
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download("google/t5-base-lm-adapt", local_files_only=True))
    except Exception:
        return None
    weight_files = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
    has_weights = any((folder / f).exists() for f in weight_files)
    return folder if (folder / "config.json").exists() and has_weights else None


@pytest.mark.slow
def test_released_prompts_match_release_notes(shared_data, tmp_path):
    folder = _base_checkpoint()
    if folder is None:
        pytest.skip("no T5 1.1 LM-adapted Base weights here (set SPOT_T5_BASE to a HF checkpoint folder, or "
                    f"cache google/t5-base-lm-adapt); with them, run: {COMMAND}")
    record = rp.main(["--model", str(folder), "--vocab", str(shared_data / "t5_spiece.model"),
                      "--prompts", str(shared_data / "prompt_tuning_release" / "t5_1_1_lm100k_base"),
                      "--data", str(shared_data / "glue"), "--out", str(tmp_path)])
    misses = [(r["task"], metric, round(r["metrics"][metric], 2), released) for r in record["results"]
              for metric, released in r["released"].items() if abs(r["metrics"][metric] - released) > 0.5]
    assert not misses, f"(task, metric, ours, released) more than 0.5 points apart: {misses}"
