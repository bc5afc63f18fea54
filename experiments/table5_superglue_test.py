"""Table 5 of SPoT (Vu et al., ACL 2022, App. D): SuperGLUE test predictions, as the leaderboard's upload.

Test labels are hidden, so the paper's row is the score the SuperGLUE leaderboard gave such an upload
(2022-02-09):
  Frozen T5 1.1 + SPoT (XXL), 11B frozen / 410K tuned parameters: score 89.2; BoolQ 91.1,
  CB 95.8/97.6 (F1/acc), COPA 95.6, MultiRC 87.9/61.9 (F1a/EM), ReCoRD 93.3/92.4 (F1/EM), RTE 92.9,
  WiC 75.8, WSC 93.8.
Recipe as the paper gives it: the frozen T5 1.1 LM-adapted XXL with one 100-token prompt per task
(410K = 100 x 4096 tuned parameters, the only ones), tuned with SPoT (§2.1: the target prompt starts from a
source prompt; GLUE is the best source mixture, Table 1 and Fig. 1) and the best-validation checkpoint
(§2.1.4). The paper does not say more about the submission (its source mixture or steps); prompts from this
repo's `spot.py train` fill that in.
The command (one prompt per task in runs/<task>/prompt.npy, as `spot.py train --task <task> --out
runs/<task>` writes it; <task> = boolq cb copa multirc record superglue_rte (or rte) wic wsc; or
--prompts one.npy for all):
  python3 experiments/table5_superglue_test.py --model google/t5-xxl-lm-adapt --prompts runs \
      --data <folder of the unzipped SuperGLUE tasks: BoolQ/test.jsonl ... AX-b/AX-b.jsonl, AX-g/AX-g.jsonl>
Then upload results/table5_superglue_test.zip at https://super.gluebenchmark.com/ (the leaderboard scores it).
Compute (estimated, not measured): 29,694 test inputs (BoolQ 3245, CB 250, COPA 500, MultiRC 9693 answers,
ReCoRD 10000 queries, RTE 3000, WiC 1400, WSC 146, AX-b 1104, AX-g 356); the XXL encoder (4.6B weights) over
100 prompt + ~300 input tokens is ~3.7 TFLOP an input, greedy decoding (8 tokens, ReCoRD 32, WSC 16) ~0.1-0.4
more: ~1.2e17 FLOP, ~15 min at a sustained 150 TFLOP/s, days on a CPU; the 11.1B weights need 45 GB in
float32.
--tiny: a random tiny T5 on the first validation examples that
`python3 data.py fetch superglue t5_spiece.model` puts in the cache, with their labels removed, and hand-made
ReCoRD / AX-b / AX-g files in the original layout, in a temporary folder; ~20 s; its predictions
mean nothing.

The upload (the leaderboard's FAQ, https://super.gluebenchmark.com/faq, as its copy at
russiansuperglue.com/faq reads: one <Task>.jsonl per test file, one JSON object per line with the example's
`idx` and a `label`, zipped; the diagnostics "generally should use your RTE classifier"). Names and labels as
the SuperGLUE authors' toolkit writes them (nyu-mll/jiant: jiant/scripts/benchmarks/benchmarks.py, the
tasks' super_glue_format_preds; the same in jiant 1.x src/evaluate.py):
  BoolQ, WiC       {"idx": 0, "label": "true"|"false"}
  CB               {"idx": 0, "label": "entailment"|"contradiction"|"neutral"}
  COPA             {"idx": 0, "label": 0|1}
  RTE, AX-b, AX-g  {"idx": 0, "label": "entailment"|"not_entailment"}
  WSC              {"idx": 0, "label": "True"|"False"}
  ReCoRD           {"idx": <query idx>, "label": "<entity string>"}
  MultiRC, a line per paragraph:
                   {"idx": 0, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}]}]}}
AX-b and AX-g are scored with the RTE prompt in RTE's input format, as T5's super_glue_axb/axg tasks do
(t5/data/tasks.py: AX-b's sentence1/sentence2 renamed premise/hypothesis; glue_utils: "cast as RTE").
A decoded string that is no valid label (T5's postprocessors would score it -1, i.e. wrong) cannot be
written as "wrong": it is replaced by rank classification, the valid label (ReCoRD: the passage's entity)
whose target the model scores most likely, and counted in the printout and
results/table5_superglue_test.json. A WSC referent that names no one (empty, or determiners only: T5's
wsc_simple gives -1) is written "False" and counted the same way.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import argparse
import json
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import data
import spot
from experiments import common, paper_numbers

# Leaderboard file -> (data.py task: input format, prompt and T5 label strings;
#                      label written for class 0, 1, ...).
SUBMISSION = {
    "BoolQ": ("boolq", ("false", "true")),
    "CB": ("cb", ("entailment", "contradiction", "neutral")),
    "COPA": ("copa", (0, 1)),                         # T5 targets "choice1" / "choice2"
    "MultiRC": ("multirc", (0, 1)),                   # per answer, nested by paragraph and question
    "ReCoRD": ("record", None),                       # the entity string itself
    "RTE": ("superglue_rte", ("entailment", "not_entailment")),
    "WiC": ("wic", ("false", "true")),
    "WSC": ("wsc", ("False", "True")),                # True = the decoded referent names the candidate span
    "AX-b": ("superglue_rte", ("entailment", "not_entailment")),
    "AX-g": ("superglue_rte", ("entailment", "not_entailment")),
}
# Diagnostic file -> its two sentence fields, read as (premise, hypothesis).
DIAGNOSTICS = {"AX-b": ("sentence1", "sentence2"), "AX-g": ("premise", "hypothesis")}
LEAF = {"MultiRC": "answer", "ReCoRD": "query"}       # the idx part that names one prediction
NESTED_IDX = {"MultiRC": ("paragraph", "question", "answer"), "ReCoRD": ("passage", "query")}


# ----------------------------------------------------------------------------- test examples and their idx
def load_test(name, data_dir):
    """The test examples of one leaderboard file, as data.py reads them (label -1, the file's idx)."""
    if name not in DIAGNOSTICS:
        return data.load_examples(SUBMISSION[name][0], "test", data_dir)
    root, rel = Path(data_dir), Path(name) / f"{name}.jsonl"
    path = next((p for p in (root / rel, root / "superglue" / rel, root / rel.name) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {rel} under {root}: get {name}.zip from {data.SUPERGLUE_URL}")
    first, second = DIAGNOSTICS[name]
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):   # -sig: drop a BOM
        if not line.strip():                                                           # a blank line
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e}); pass the unmodified {name}.jsonl") from e
        missing = [k for k in (first, second, "idx") if k not in row] if isinstance(row, dict) else ["all"]
        if missing:
            raise ValueError(f"{path} line {n}: no {', '.join(map(repr, missing))} field; pass the "
                             f"unmodified {name}.jsonl ({data.SUPERGLUE_URL})")
        out.append({"premise": row[first], "hypothesis": row[second], "idx": row["idx"], "label": -1})
    return out


def check_idx(name, examples):
    """Refuse a split the leaderboard could not match to its labels: an example without a valid idx, an idx
    used twice (MultiRC: an answer idx; ReCoRD: a query idx), or a MultiRC question idx under two
    paragraphs."""
    seen, paragraph_of = {}, {}
    for n, ex in enumerate(examples):
        idx = ex.get("idx")
        parts = NESTED_IDX.get(name)
        if parts:
            valid = isinstance(idx, dict) and all(type(idx.get(k)) is int for k in parts)
        else:
            valid = type(idx) is int
        if not valid:
            raise ValueError(f"{name} test example {n} has no valid idx ({idx!r}); the leaderboard matches "
                             "predictions by idx: pass the unmodified test file")
        key = idx[LEAF[name]] if name in LEAF else idx
        if key in seen:
            raise ValueError(f"{name}: idx {key} appears twice (examples {seen[key]} and {n}); the "
                             "leaderboard needs one prediction per idx: pass the unmodified test file")
        seen[key] = n
        if name != "MultiRC":
            continue
        first = paragraph_of.setdefault(idx["question"], idx["paragraph"])
        if first != idx["paragraph"]:
            raise ValueError(f"MultiRC: question idx {idx['question']} appears under paragraphs {first} "
                             f"and {idx['paragraph']}; pass the unmodified test file")


# ----------------------------------------------------------------------------- predictions -> labels
def to_label(name, prediction, example):
    """A decoded T5 string -> the leaderboard's label, or None when it is no valid label (T5 would score -1).
    Example: to_label("BoolQ", "True", ex) -> "true"; to_label("COPA", "choice2", ex) -> 1."""
    task, labels = SUBMISSION[name]
    if labels is None:                                # ReCoRD: one of the passage's entities
        return prediction if prediction in example["entities"] else None
    c = data.postprocess(task, prediction, example)   # class index (-1: not a label; WSC: names no one)
    return labels[c] if 0 <= c < len(labels) else None


def candidates(name, example):
    """The T5 strings rank classification chooses from: the task's labels, or ReCoRD's entities."""
    task, labels = SUBMISSION[name]
    return example["entities"] if labels is None else data.get_task(task).label_names


def predict_file(name, examples, frozen, cfg, prompt, vocab, args):
    """Leaderboard labels of one file's examples, and how many decoded strings were invalid (then ranked)."""
    task = data.get_task(SUBMISSION[name][0])
    inputs = data.token_ids(vocab, [t["inputs"] for t in data.text_pairs(task.name, examples)],
                            args.max_input_len)

    def predict(rows, method):  # spot.evaluate of examples `rows`; rank: among each one's candidates
        return spot.evaluate(frozen, cfg, prompt, [inputs[i] for i in rows], vocab, method=method,
                             choices=[candidates(name, examples[i]) for i in rows],
                             max_target_len=task.target_len, batch_size=args.batch_size)
    # T5 / the paper: greedy decoding; WSC's target is the referent's text: always decoded
    preds = predict(range(len(examples)), "decode" if name == "WSC" else args.method)
    labels = [to_label(name, p, ex) for p, ex in zip(preds, examples)]
    bad = [i for i, lab in enumerate(labels) if lab is None]
    if name == "WSC":       # names no one (T5's -1): the candidate is not the referent
        labels = ["False" if lab is None else lab for lab in labels]
    elif bad:
        for i, p in zip(bad, predict(bad, "rank")):
            labels[i] = to_label(name, p, examples[i])
    return labels, preds, len(bad)


# ----------------------------------------------------------------------------- the files
def submission_lines(name, examples, labels):
    """One JSON object per line in the leaderboard's layout (module docstring), in the examples' order."""
    if name == "MultiRC":
        paragraphs = {}
        for ex, lab in zip(examples, labels):
            questions = paragraphs.setdefault(ex["idx"]["paragraph"], {})
            answer = {"idx": ex["idx"]["answer"], "label": lab}
            questions.setdefault(ex["idx"]["question"], []).append(answer)
        return [{"idx": p, "passage": {"questions": [{"idx": q, "answers": a} for q, a in qs.items()]}}
                for p, qs in paragraphs.items()]
    return [{"idx": ex["idx"][LEAF[name]] if name in LEAF else ex["idx"], "label": lab}
            for ex, lab in zip(examples, labels)]


def write_jsonl(path, lines):
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    Path(path).write_text(text, encoding="utf-8")


def read_submission(path, name):
    """A leaderboard file -> {idx: label} (MultiRC: answer idx; ReCoRD: query idx). Refuses a repeated idx."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if name == "MultiRC":
            pairs = [(a["idx"], a["label"]) for q in row["passage"]["questions"] for a in q["answers"]]
        else:
            pairs = [(row["idx"], row["label"])]
        for idx, label in pairs:
            if idx in out:
                raise ValueError(f"{path} line {n}: idx {idx} again")
            out[idx] = label
    return out


def score_submission(name, examples, by_idx):
    """The leaderboard's metrics (x100, T5's definitions in data.METRICS) of {idx: label} against labelled
    examples; 'score' = their mean as in data.score. The check that a written file keeps what data.score
    measured."""
    task, labels = SUBMISSION[name]
    keys = [ex["idx"][LEAF[name]] if name in LEAF else ex["idx"] for ex in examples]
    preds = [by_idx[k] for k in keys]
    if name == "ReCoRD":
        targets = [(ex["answers"], (ex["idx"]["passage"], ex["idx"]["query"])) for ex in examples]
    else:
        preds = [labels.index(p) for p in preds]
        targets = [(ex["label"], (ex["idx"]["paragraph"], ex["idx"]["question"])) if name == "MultiRC"
                   else ex["label"] for ex in examples]
    out = {}
    for metric in data.get_task(task).metrics:
        out.update(data.METRICS[metric](targets, preds))
    out["score"] = float(np.mean(list(out.values())))
    return out


# ----------------------------------------------------------------------------- prompts, --tiny data
def _key(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


def load_prompts(path, d_model):
    """{leaderboard file: prompt [P, d_model]}: one .npy for every task, or a folder of <task>/prompt.npy
    (<task> = the data.py name, e.g. superglue_rte, or the leaderboard's, e.g. RTE; any case).
    AX-b/AX-g: RTE's."""
    path = Path(path)
    if path.is_file():
        prompt = spot.load_prompt(path, d_model)
        return {name: prompt for name in SUBMISSION}
    if not path.is_dir():
        raise FileNotFoundError(f"--prompts {path}: no such file or folder")
    folders = {_key(p.name): p / "prompt.npy" for p in path.iterdir() if (p / "prompt.npy").is_file()}
    prompts = {}
    for name, (task, _) in SUBMISSION.items():
        if name in DIAGNOSTICS:
            prompts[name] = prompts["RTE"]
            continue
        found = next((folders[k] for k in (_key(task), _key(name)) if k in folders), None)
        if found is None:
            raise FileNotFoundError(f"--prompts {path}: no {task}/prompt.npy (or {name}/prompt.npy); train "
                                    f"it with `python3 spot.py train --task {task} --out {path / task}`")
        prompts[name] = spot.load_prompt(found, d_model)
    return prompts


TINY_RECORD = [  # the original ReCoRD layout (test: no answers); entity spans are inclusive character offsets
    {"source": "Daily mail", "idx": 0, "passage": {
        "text": "Ada Lovelace wrote the first program for Charles Babbage's engine in London.\n@highlight\n"
                "Lovelace saw that machines could do more than arithmetic",
        "entities": [{"start": 0, "end": 11}, {"start": 41, "end": 55}, {"start": 69, "end": 74},
                     {"start": 88, "end": 95}]},
     "qas": [{"query": "@placeholder published notes on the Analytical Engine.", "idx": 0},
             {"query": "The engine was designed by @placeholder.", "idx": 1}]},
    {"source": "Daily mail", "idx": 1, "passage": {
        "text": "The Thames flows through Oxford before it reaches London.",
        "entities": [{"start": 4, "end": 9}, {"start": 25, "end": 30}, {"start": 50, "end": 55}]},
     "qas": [{"query": "@placeholder is upstream of London.", "idx": 2}]},
]
TINY_AX = {  # the original AX-b / AX-g layouts (their labels are public; the script does not read them)
    "AX-b": [{"sentence1": "The cat sat on the mat.", "sentence2": "The mat was under the cat.",
              "label": "entailment", "idx": 0, "logic": "", "lexical-semantics": "",
              "predicate-argument-structure": "Active/Passive", "knowledge": ""},
             {"sentence1": "No dog barked.", "sentence2": "A dog barked.", "label": "not_entailment",
              "idx": 1, "logic": "Negation", "lexical-semantics": "", "predicate-argument-structure": "",
              "knowledge": ""}],
    "AX-g": [{"premise": "The nurse notified the patient that her shift would be ending in an hour.",
              "hypothesis": "The nurse's shift would be ending in an hour.", "label": "entailment",
              "idx": 0, "pair_id": 551646},
             {"premise": "The nurse notified the patient that his shift would be ending in an hour.",
              "hypothesis": "The patient's shift would be ending in an hour.", "label": "not_entailment",
              "idx": 1, "pair_id": 551646}],
}


def _unlabel(row):
    """A validation record as the test file has it: no 'label' anywhere (MultiRC: none on its answers)."""
    row = {k: v for k, v in row.items() if k != "label"}
    if "passage" in row and isinstance(row["passage"], dict) and "questions" in row["passage"]:
        row["passage"]["questions"] = [{**q, "answers": [_unlabel(a) for a in q["answers"]]}
                                       for q in row["passage"]["questions"]]
    return row


def write_tiny_data(out, superglue=None, n=8):
    """--tiny's test files: the first n validation records of each task in `superglue` (default: the cache's)
    with labels removed (MultiRC: 2 paragraphs), plus TINY_RECORD and TINY_AX. Returns `out`."""
    out, superglue = Path(out), Path(superglue or data.data_root() / "superglue")
    for name, (task, _) in SUBMISSION.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        if name == "ReCoRD":
            rows = TINY_RECORD
        elif name in DIAGNOSTICS:
            rows = TINY_AX[name]
        else:
            lines = (superglue / name / "val.jsonl").read_text(encoding="utf-8").splitlines()
            rows = [_unlabel(json.loads(x)) for x in lines[:2 if name == "MultiRC" else n]]
        write_jsonl(out / name / (f"{name}.jsonl" if name in DIAGNOSTICS else "test.jsonl"), rows)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="google/t5-xxl-lm-adapt",
                   help="hub id or checkpoint folder (Table 5: XXL)")
    p.add_argument("--prompts",
                   help="folder of <task>/prompt.npy (spot.py train --out), or one .npy for all tasks")
    p.add_argument("--data",
                   help="folder with the unzipped SuperGLUE tasks: <Task>/test.jsonl, AX-b/AX-b.jsonl ...")
    p.add_argument("--vocab", help="SentencePiece model (default: the one of --model)")
    p.add_argument("--method", choices=("decode", "rank"), default="decode",
                   help="decode: greedy, as T5 and the paper (default); rank: rank classification of every "
                        "example (WSC is decoded either way)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=spot.DTYPES,
                   help="frozen weights/activations (spot.py)")
    p.add_argument("--max_input_len", "--max-input-len", type=int, default=data.MAX_INPUT_LEN)
    p.add_argument("--out", default=str(common.ROOT / "results"),
                   help="folder for the zip, its files and the json")
    p.add_argument("--tiny", action="store_true",
                   help="random tiny T5, a few examples per file, seconds (CI)")
    p.add_argument("--debug", action="store_true", help="show an error's traceback (also SPOT_DEBUG=1)")
    args = p.parse_args(argv)
    if not args.tiny and not (args.prompts and args.data):
        p.error("--prompts and --data are required (or --tiny)")
    args.out = common.tiny_out(args.out, args.tiny)       # a tiny run never overwrites a real one
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:       # user input: one line naming the problem, no traceback
        raise SystemExit(f"table5_superglue_test: {e}")


def run(args):
    start, tmp = time.time(), None
    print(spot.device_summary(), flush=True)
    if args.tiny:  # random tiny T5; test files and per-task random prompts written to a temporary folder
        cfg, frozen = common.frozen_model("", True, args.dtype)
        vocab = common.vocab_for("", True)
        if vocab is None or not (data.data_root() / "superglue").is_dir():
            raise FileNotFoundError("--tiny reads t5_spiece.model and superglue/*/val.jsonl from "
                                    f"{data.data_root()}: python3 data.py fetch superglue t5_spiece.model")
        tmp = Path(tempfile.mkdtemp(prefix="table5_tiny_"))
        args.data = args.data or str(write_tiny_data(tmp / "data"))
        args.batch_size, args.max_input_len = 8, 64
        for i, (task, _) in enumerate(SUBMISSION.values()):
            (tmp / "prompts" / task).mkdir(parents=True, exist_ok=True)
            np.save(tmp / "prompts" / task / "prompt.npy",
                    np.random.default_rng(i).normal(size=(8, cfg.d_model)).astype(np.float32))
        args.prompts = args.prompts or str(tmp / "prompts")
    else:
        vocab = data.model_vocab(args.model, args.vocab)
    try:
        # Read and checked before the weights load.
        tests = {name: load_test(name, args.data) for name in SUBMISSION}
        for name, examples in tests.items():
            check_idx(name, examples)
        if not args.tiny:
            cfg, frozen = common.frozen_model(args.model, False, args.dtype)
            spot.check_vocab(vocab, cfg, args.model)
        prompts = load_prompts(args.prompts, cfg.d_model)
        folder = Path(args.out) / "table5_superglue_test"
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for name, examples in tests.items():
            labels, preds, invalid = predict_file(name, examples, frozen, cfg, prompts[name], vocab, args)
            lines = submission_lines(name, examples, labels)
            write_jsonl(folder / f"{name}.jsonl", lines)
            records.append({"task": name, "seed": None, "source": None, "method": args.method, "score": None,
                            "metrics": {}, "examples": len(examples), "lines": len(lines), "invalid": invalid,
                            "first_prediction": preds[0], "first_line": lines[0]})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    zip_path = Path(args.out) / "table5_superglue_test.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in SUBMISSION:
            z.write(folder / f"{name}.jsonl", arcname=f"{name}.jsonl")
    print("Table 5: SuperGLUE test predictions in the leaderboard's format"
          + ("  [--tiny: random tiny T5, a few examples: the predictions mean nothing]" if args.tiny else ""))
    print(f"  {'file':<14}{'examples':>9}{'lines':>7}{'invalid':>9}   first line")
    for r in records:
        print(f"  {r['task'] + '.jsonl':<14}{r['examples']:>9}{r['lines']:>7}{r['invalid']:>9}   "
              f"{json.dumps(r['first_line'])[:70]}")
    print("  invalid = decoded strings that are no label, replaced by rank classification "
          f"({args.method} run)")
    paper = paper_numbers.TABLE5["Frozen T5 1.1 + SPoT (XXL)"][2]
    print(f"wrote {zip_path}: upload it at https://super.gluebenchmark.com/ "
          f"(paper: SPoT XXL scored {paper})")
    config = {"model": "tiny" if args.tiny else args.model, "method": args.method,
              "batch_size": args.batch_size, "max_input_len": args.max_input_len,
              "prompts": None if args.tiny else args.prompts, "data": None if args.tiny else args.data,
              "zip": str(zip_path), "seconds": round(time.time() - start, 1), "tiny": args.tiny}
    result = {"experiment": "table5_superglue_test", "config": config, "results": records,
              "summary": {"Frozen T5 1.1 + SPoT (XXL)": {"mean": None, "std": None, "paper": [paper, None]}}}
    path = Path(args.out) / "table5_superglue_test.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    common.run_main(main)
