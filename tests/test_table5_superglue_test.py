"""experiments/table5_superglue_test.py: the leaderboard's file layout and the --tiny run end to end.

Also a validation round trip that keeps data.score, refused test splits and the invalid-prediction fallback
(~30 s on 2 cores)."""
import json
import zipfile

import jax
import numpy as np
import pytest

import data
import spot
import t5_model
from experiments import table5_superglue_test as T

FILES = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC", "AX-b", "AX-g")


def written(tmp_path, name, examples, predictions):
    """T5 strings -> leaderboard labels -> the file's text."""
    labels = [T.to_label(name, p, ex) for p, ex in zip(predictions, examples)]
    T.write_jsonl(tmp_path / f"{name}.jsonl", T.submission_lines(name, examples, labels))
    return (tmp_path / f"{name}.jsonl").read_text()


def test_file_layout_matches_the_format_description(tmp_path):
    """Lines written by hand from the format (SuperGLUE FAQ; jiant's super_glue_format_preds), one per
    task."""
    flat = [{"idx": 0, "label": -1}, {"idx": 1, "label": -1}]
    assert written(tmp_path, "BoolQ", flat, ["True", "False"]) == \
        '{"idx": 0, "label": "true"}\n{"idx": 1, "label": "false"}\n'
    assert written(tmp_path, "WiC", flat, ["False", "True"]) == \
        '{"idx": 0, "label": "false"}\n{"idx": 1, "label": "true"}\n'
    assert written(tmp_path, "CB", flat, ["neutral", "contradiction"]) == \
        '{"idx": 0, "label": "neutral"}\n{"idx": 1, "label": "contradiction"}\n'
    assert written(tmp_path, "COPA", flat, ["choice2", "choice1"]) == \
        '{"idx": 0, "label": 1}\n{"idx": 1, "label": 0}\n'
    for name in ("RTE", "AX-b", "AX-g"):
        assert written(tmp_path, name, flat, ["not_entailment", "entailment"]) == \
            '{"idx": 0, "label": "not_entailment"}\n{"idx": 1, "label": "entailment"}\n'
    wsc = [{"idx": i, "text": f"{who} saw it and he ran .", "span1_text": who, "span1_index": 0,
            "span2_index": 4, "span2_text": "he", "label": -1} for i, who in ((7, "Mark"), (8, "the dog"))]
    assert written(tmp_path, "WSC", wsc, ["Mark", "the cat"]) == \
        '{"idx": 7, "label": "True"}\n{"idx": 8, "label": "False"}\n'
    record = [{"idx": {"passage": 3, "query": 12}, "entities": ["Ada Lovelace", "London"], "answers": []}]
    assert written(tmp_path, "ReCoRD", record, ["London"]) == '{"idx": 12, "label": "London"}\n'
    multirc = [{"idx": {"paragraph": p, "question": q, "answer": a}, "label": -1}
               for p, q, a in [(0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 2, 3)]]
    assert written(tmp_path, "MultiRC", multirc, ["True", "False", "False", "True"]) == (
        '{"idx": 0, "passage": {"questions": ['
        '{"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]}, '
        '{"idx": 1, "answers": [{"idx": 2, "label": 0}]}]}}\n'
        '{"idx": 1, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 3, "label": 1}]}]}}\n')


def test_diagnostics_are_read_in_rtes_input_format(tmp_path):
    """T5's super_glue_axb/axg: AX-b's sentence1/sentence2 become premise/hypothesis, then RTE's text."""
    folder = tmp_path / "data"
    for name, rows in T.TINY_AX.items():
        (folder / name).mkdir(parents=True)
        T.write_jsonl(folder / name / f"{name}.jsonl", rows)
    ax_b, ax_g = (T.load_test(name, folder) for name in ("AX-b", "AX-g"))
    assert data.to_text("superglue_rte", ax_b[0])["inputs"] == \
        "rte hypothesis: The mat was under the cat. premise: The cat sat on the mat."
    assert data.to_text("superglue_rte", ax_g[1])["inputs"] == (
        "rte hypothesis: The patient's shift would be ending in an hour. "
        "premise: The nurse notified the patient that his shift would be ending in an hour.")
    assert [ex["idx"] for ex in ax_b] == [0, 1] and all(ex["label"] == -1 for ex in ax_b + ax_g)
    path = folder / "AX-b" / "AX-b.jsonl"                   # a byte order mark and blank lines are read too
    path.write_text("\ufeff" + path.read_text().replace("\n", "\n\n"), encoding="utf-8")
    assert T.load_test("AX-b", folder) == ax_b


def test_invalid_strings_are_no_label():
    ex = {"idx": 0, "label": -1, "entities": ["London"], "text": "Mark saw it and he ran .",
          "span1_text": "Mark", "span1_index": 0, "span2_index": 4, "span2_text": "he"}
    for name, bad in [("BoolQ", "true"), ("CB", "Neutral"), ("COPA", "1"), ("MultiRC", "yes"), ("RTE", ""),
                      ("WiC", "no"), ("ReCoRD", "london"), ("AX-b", "entail"), ("WSC", ""), ("WSC", "the")]:
        assert T.to_label(name, bad, ex) is None, name
    # T5's wsc_simple: any string is a yes/no about the referent
    assert T.to_label("WSC", "banana", ex) == "False"


def _answers(*spans):
    """ReCoRD answers as the validation file has them: inclusive character spans of the passage and their
    text."""
    return [{"start": a, "end": b, "text": text} for a, b, text in spans]


RECORD_VAL = [  # TINY_RECORD with the answers of a validation file
    {**T.TINY_RECORD[0], "qas": [
        {**T.TINY_RECORD[0]["qas"][0], "answers": _answers((0, 11, "Ada Lovelace"), (88, 95, "Lovelace"))},
        {**T.TINY_RECORD[0]["qas"][1], "answers": _answers((41, 55, "Charles Babbage"))}]},
    {**T.TINY_RECORD[1], "qas": [{**T.TINY_RECORD[1]["qas"][0], "answers": _answers((25, 30, "Oxford"))}]},
]


@pytest.mark.parametrize("name", ["BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC"])
def test_validation_round_trip_gives_data_score(name, shared_data, tmp_path):
    """Validation predictions written as the upload and read back against the labels score exactly
    data.score."""
    task = T.SUBMISSION[name][0]
    if name == "ReCoRD":
        (tmp_path / "ReCoRD").mkdir()
        T.write_jsonl(tmp_path / "ReCoRD" / "val.jsonl", RECORD_VAL)
        examples = data.load_examples(task, "validation", tmp_path)
    else:
        examples = data.load_examples(task, "validation", shared_data / "superglue")
    rng = np.random.default_rng(len(name))
    # Random valid predictions; trial 0: the gold targets (100 where the metric allows).
    for trial in range(3):
        preds = [data.to_text(task, ex)["targets"] if trial == 0 else
                 rng.choice(ex["entities"]) if name == "ReCoRD" else
                 rng.choice([ex["span1_text"], "someone else"]) if name == "WSC" else   # both name someone
                 rng.choice(data.get_task(task).label_names) for ex in examples]
        expected = data.score(task, examples, preds)
        written(tmp_path, name, examples, preds)
        got = T.score_submission(name, examples, T.read_submission(tmp_path / f"{name}.jsonl", name))
        assert got == expected, (name, trial)
    assert expected["score"] < 100  # the random trials are not all right


def test_rank_picks_the_most_likely_of_each_rows_candidates(shared_data):
    """spot.evaluate's rank classification with candidates per example (ReCoRD's entities)."""
    cfg = t5_model.T5Config.tiny()
    frozen = t5_model.init_params(jax.random.key(1), cfg)
    vocab = data.load_vocab(shared_data / "t5_spiece.model")
    texts = [{"inputs": t, "targets": ""} for t in ("a b c", "d e", "f")]
    inputs = data.tokenize(vocab, texts, 16, 4)["inputs"]
    choices = [["yes", "no", "maybe"], ["cat"], ["x", "y"]]
    got = spot.evaluate(frozen, cfg, None, data.unpad(inputs), vocab, method="rank", choices=choices,
                        max_target_len=4, batch_size=2)
    for row, c, pick in zip(inputs, choices, got):
        y = data.tokenize(vocab, [{"inputs": "", "targets": s} for s in c], 1, 4)["targets"]
        scores = np.asarray(t5_model.score_targets(frozen, cfg, np.repeat(row[None], len(c), 0), y, None))
        assert pick == c[int(np.argmax(scores))]


def test_invalid_predictions_are_ranked_and_counted(monkeypatch, shared_data):
    cfg = t5_model.T5Config.tiny()
    frozen = t5_model.init_params(jax.random.key(0), cfg)
    vocab = data.load_vocab(shared_data / "t5_spiece.model")
    examples = [{"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i, "label": -1} for i in range(4)]
    decoded = ["entailment", "Entailment", "not_entailment", "?"]
    evaluate = spot.evaluate
    monkeypatch.setattr(spot, "evaluate", lambda *a, method, **k: list(decoded) if method == "decode"
                        else evaluate(*a, method=method, **k))
    args = type("Args", (), {"method": "decode", "max_input_len": 16, "batch_size": 4})()
    labels, preds, invalid = T.predict_file("RTE", examples, frozen, cfg, None, vocab, args)
    assert preds == decoded and invalid == 2
    assert labels[0] == "entailment" and labels[2] == "not_entailment"
    inputs = data.token_ids(vocab, [t["inputs"] for t in data.text_pairs("superglue_rte", examples)], 16)
    labels_rte = list(data.get_task("superglue_rte").label_names)
    ranked = evaluate(frozen, cfg, None, [inputs[1], inputs[3]], vocab, method="rank",
                      choices=[labels_rte] * 2, max_target_len=8)
    assert [labels[1], labels[3]] == ranked


@pytest.mark.parametrize("case", ["missing", "duplicate"])
@pytest.mark.parametrize("name", ["BoolQ", "MultiRC", "ReCoRD", "AX-b"])
def test_test_split_with_missing_or_duplicate_idx_is_refused(name, case, shared_data, tmp_path):
    folder = T.write_tiny_data(tmp_path / "data", shared_data / "superglue")
    path = folder / name / (f"{name}.jsonl" if name in T.DIAGNOSTICS else "test.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    inner = {"MultiRC": lambda r: r["passage"]["questions"][0]["answers"], "ReCoRD": lambda r: r["qas"]}
    items = inner[name](rows[0]) if name in inner else rows
    if case == "missing":
        del items[1]["idx"]
    else:
        items[1]["idx"] = items[0]["idx"]
    T.write_jsonl(path, rows)
    expected = r"KeyError: 'idx'|no 'idx' field" if case == "missing" else "appears twice"
    with pytest.raises(SystemExit, match=expected):
        T.main(["--tiny", "--data", str(folder), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "table5_superglue_test.zip").exists()


def test_check_idx_refuses_examples_without_idx():
    with pytest.raises(ValueError, match="no valid idx"):
        T.check_idx("CB", [{"idx": 0}, {"label": 1}])
    with pytest.raises(ValueError, match="no valid idx"):
        T.check_idx("ReCoRD", [{"idx": {"passage": 0}}])
    with pytest.raises(ValueError, match="under paragraphs"):
        T.check_idx("MultiRC", [{"idx": {"paragraph": 0, "question": 0, "answer": 0}},
                                {"idx": {"paragraph": 1, "question": 0, "answer": 1}}])


def test_load_prompts(tmp_path):
    for i, task in enumerate(["boolq", "CB", "copa", "multirc", "record", "rte", "WiC", "wsc"]):
        (tmp_path / task).mkdir()
        np.save(tmp_path / task / "prompt.npy", np.full((3, 16), i, np.float32))
    prompts = T.load_prompts(tmp_path, 16)
    assert set(prompts) == set(FILES)
    assert prompts["RTE"][0, 0] == prompts["AX-b"][0, 0] == prompts["AX-g"][0, 0] == 5  # the RTE prompt
    assert prompts["WiC"][0, 0] == 6
    assert all(p.shape == (3, 16) for p in T.load_prompts(tmp_path / "rte" / "prompt.npy", 16).values())
    (tmp_path / "wsc" / "prompt.npy").unlink()
    with pytest.raises(FileNotFoundError, match="spot.py train --task wsc"):
        T.load_prompts(tmp_path, 16)
    with pytest.raises(ValueError, match="d_model 32"):
        T.load_prompts(tmp_path / "rte" / "prompt.npy", 32)


def test_tiny_writes_every_test_example_into_the_zip(shared_data, tmp_path):
    res = T.main(["--tiny", "--out", str(tmp_path)])
    assert not (tmp_path / "table5_superglue_test.json").exists()              # --tiny writes OUT/tiny
    saved = json.loads((tmp_path / "tiny" / "table5_superglue_test.json").read_text())
    assert saved == json.loads(json.dumps(res)) and saved["config"]["tiny"] is True
    with zipfile.ZipFile(tmp_path / "tiny" / "table5_superglue_test.zip") as z:
        assert sorted(z.namelist()) == sorted(f"{n}.jsonl" for n in FILES)
        files = {n: z.read(f"{n}.jsonl").decode() for n in FILES}
    tests = T.write_tiny_data(tmp_path / "same_data", shared_data / "superglue")  # what --tiny predicted
    for r in saved["results"]:
        name = r["task"]
        examples = T.load_test(name, tests)
        (tmp_path / "read").mkdir(exist_ok=True)
        (tmp_path / "read" / f"{name}.jsonl").write_text(files[name])
        by_idx = T.read_submission(tmp_path / "read" / f"{name}.jsonl", name)
        keys = [ex["idx"][T.LEAF[name]] if name in T.LEAF else ex["idx"] for ex in examples]
        assert sorted(by_idx) == sorted(keys) and r["examples"] == len(examples), name  # every example, once
        assert 0 <= r["invalid"] <= len(examples)
        allowed = T.SUBMISSION[name][1]
        for ex, key in zip(examples, keys):
            assert by_idx[key] in (ex["entities"] if allowed is None else allowed), (name, by_idx[key])
    counts = {r["task"]: r["lines"] for r in saved["results"]}
    assert counts["MultiRC"] == 2 and counts["ReCoRD"] == 3 and counts["AX-g"] == 2


def test_tiny_rank_method_leaves_nothing_invalid(shared_data, tmp_path):
    res = T.main(["--tiny", "--method", "rank", "--out", str(tmp_path)])
    assert [r["task"] for r in res["results"]] == list(FILES)
    # Ranked labels are labels by construction.
    assert all(r["invalid"] == 0 for r in res["results"]), res["results"]
