"""Google's released prompts through this code: an end-to-end check on real weights, with no training.

google-research/prompt-tuning released three [100, 768] prompts for the frozen T5 1.1 LM-adapted Base with
GLUE validation scores (pretrained_prompts/t5_1_1_lm100k_base/README.md): SST-2 acc 95.07, MRPC F1/acc
89.7/85.3, RTE acc 68.6. Matching them tests load_checkpoint, the prompt in encode (Lester et al. 2021 §2),
greedy decoding (spot.evaluate), the exact input format (taskless_text) and data.score at once. The command
(the prompts come from the cache that `python3 data.py fetch` fills, fetched on first use; the GLUE files
from tfds, or from that cache as here):
  python3 experiments/released_prompts.py --model google/t5-base-lm-adapt \
      --data "$(python3 data.py fetch glue)/glue"
872 + 408 + 277 examples: ~28 CPU-minutes (~15-25 min on 2 cores), minutes on a GPU (not yet timed there).
Writes results/released_prompts.json. --tiny: the same path on a random tiny T5 of width 768, 8 examples per
task, seconds; its scores are meaningless.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import jax

import data
import spot
import t5_model
from experiments import common
from experiments.paper_numbers import RELEASED_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "mrpc", "rte")
# The release's folder in the layout of data.py's fetch (google-research/prompt-tuning at a fixed commit,
# prompt_tuning/pretrained_prompts/t5_1_1_lm100k_base, each file checked by its sha256 in data.FILES).
RELEASE = "prompt_tuning_release/t5_1_1_lm100k_base"


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "google/t5-base-lm-adapt"  # the frozen model of the release (its README: T5 1.1 lm100k Base)
    prompts: str | None = None              # folder with <task>.npy; None = the cache (release_folder)
    data: str | None = None                 # folder with the GLUE tsv files; None = tfds
    vocab: str | None = None                # spiece.model; None = the one beside --model
    tasks: tuple = TASKS
    limit: int | None = None                # first N validation examples of each task
    batch_size: int = 32
    max_input_len: int = 512                # PT scripts/sst2-demo-eval.sh: TASK_FEATURE_LENGTHS inputs 512
    max_target_len: int = 8                 # ... targets 8 (also the decoding length)
    out: str = str(ROOT / "results")
    tiny: bool = False


def taskless_text(task, example):
    """The official `taskless_glue_<task>_v200` text: T5's GLUE text without its first word, the task name.

    prompt_tuning/data/glue.py registers these tasks as t5 glue_utils.get_glue_text_preprocessor (t5
    preprocessors.glue: "<task> k1: v1 k2: v2", keys sorted, label -1 -> "<unk>", here data.to_text)
    followed by prompt_tuning/data/preprocessors.remove_first_text_token (deletes the regex '^[^ ]* ').
    Example: SST-2 "sst2 sentence: it 's a charming ... . " -> "sentence: it 's a charming ... . ",
    "positive".
    """
    text = data.to_text(task, example)
    return {"inputs": re.sub(r"^[^ ]* ", "", text["inputs"], count=1), "targets": text["targets"]}


def release_folder(tasks):
    """The released <task>.npy in the cache (data.data_root()), fetched there first if missing."""
    return data.fetch([f"{RELEASE}/{t}.npy" for t in tasks]) / RELEASE


def load_prompts(folder, tasks, d_model):
    """{task: float32 [P, d_model]} from folder/<task>.npy."""
    prompts = {}
    for task in tasks:
        path = Path(folder) / f"{task}.npy"
        if not path.is_file():
            needed = ", ".join(t + ".npy" for t in tasks)
            raise FileNotFoundError(f"no prompt {path}: --prompts needs {needed}")
        prompts[task] = spot.load_prompt(path, d_model)   # damaged, not a prompt, another width: one line
    return prompts


def evaluate_task(task, params, model_cfg, prompt, vocab, cfg):
    """Score one released prompt on the task's validation set with T5's postprocessing and metrics."""
    examples = data.load_examples(task, "validation", cfg.data)[:cfg.limit]
    texts = [taskless_text(task, ex) for ex in examples]
    inputs = data.token_ids(vocab, [t["inputs"] for t in texts], cfg.max_input_len)
    start = time.time()
    # Greedy = what t5x.eval ran for the release: EncoderDecoderModel's default decode_fn is
    # decoding.beam_search, called with num_decodes=1 (one beam).
    preds = spot.evaluate(params, model_cfg, prompt, inputs, vocab, max_target_len=cfg.max_target_len,
                          batch_size=cfg.batch_size, progress=spot.progress_printer(f"{task} validation"))
    # t5 postprocessors.string_label_to_class_id: an exact label word or -1, which counts as wrong in
    # accuracy and as the wrong class in metrics.f1_score_with_invalid (data.postprocess / data.score do
    # both).
    metrics = data.score(task, examples, preds)
    labels = data.get_task(task).label_names
    return {"task": task, "score": metrics["score"], "metrics": metrics, "released": RELEASED_PROMPTS[task],
            "n_examples": len(examples), "invalid_predictions": sum(p not in labels for p in preds),
            "first_input": texts[0]["inputs"], "first_prediction": preds[0],
            "seconds": round(time.time() - start, 1)}


def setup(cfg):
    """(cfg, model config, params, {task: prompt}, vocab) of the real run."""
    prompt_dir = cfg.prompts or release_folder(cfg.tasks)  # before the weights: fail fast when offline
    if cfg.data and not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data} is not a folder: pass the glue folder that "
                                f"`python3 data.py fetch glue` prints")
    vocab = data.model_vocab(cfg.model, cfg.vocab)   # as spot.py: --vocab, else --model DIR's spiece.model
    print(f"loading the weights of {cfg.model}", flush=True)
    start = time.time()
    model_cfg, params = t5_model.load_checkpoint(cfg.model)
    print(f"loaded in {time.time() - start:.1f} s", flush=True)
    spot.check_vocab(vocab, model_cfg, cfg.model)
    return cfg, model_cfg, params, load_prompts(prompt_dir, cfg.tasks, model_cfg.d_model), vocab


def tiny_setup(cfg):
    """The same for a random T5 1.1 of the prompts' width 768 (2+2 layers) on 8 examples of the local GLUE."""
    local = [] if cfg.data else [f"glue/{d}/dev.tsv" for d in ("SST-2", "MRPC", "RTE")]
    local += [] if cfg.vocab else ["t5_spiece.model"]
    local += [] if cfg.prompts else [f"{RELEASE}/{t}.npy" for t in cfg.tasks]
    root = data.fetch(local) if local else None          # the defaults: the cache, fetched if missing
    glue, prompt_dir = Path(cfg.data or root / "glue"), Path(cfg.prompts or root / RELEASE)
    # One batch of 8 per task, inputs cut to 64 tokens: a few compiled shapes for the whole run.
    vocab = cfg.vocab or str(root / "t5_spiece.model")
    cfg = dataclasses.replace(cfg, data=str(glue), vocab=vocab, limit=cfg.limit or 8, batch_size=8,
                              max_input_len=64, prompts=str(prompt_dir))
    model_cfg = t5_model.T5Config.tiny(d_model=768)
    params = t5_model.init_params(jax.random.key(0), model_cfg)
    prompts = load_prompts(prompt_dir, cfg.tasks, model_cfg.d_model)
    return cfg, model_cfg, params, prompts, data.load_vocab(cfg.vocab or cfg.model)


def print_table(results, tiny):
    print("Released prompts on GLUE validation, taskless input format, greedy decoding"
          + ("\nTINY RUN: random tiny T5, a few examples; these scores are meaningless" if tiny else ""))
    print(f"{'task':<6}{'metric':<10}{'n':>5}{'ours':>8}{'released':>10}{'diff':>8}{'invalid':>9}")
    for r in results:
        for metric, released in r["released"].items():
            ours = r["metrics"][metric]
            print(f"{r['task']:<6}{metric:<10}{r['n_examples']:>5}{ours:>8.2f}{released:>10.2f}"
                  f"{ours - released:>+8.2f}{r['invalid_predictions']:>9}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=Config.model, help="hub id or local HF checkpoint directory")
    p.add_argument("--prompts", help="folder with sst2.npy, mrpc.npy, rte.npy (default: the cache, fetched "
                   "from google-research/prompt-tuning)")
    p.add_argument("--data", help="folder with the GLUE tsv files, e.g. the glue folder that "
                   "`python3 data.py fetch glue` prints (default: tfds; --tiny: the cache)")
    p.add_argument("--vocab", help="SentencePiece model (default as spot.py: --model DIR's spiece.model, "
                   "else the hub's)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    # named as spot.py's TrainConfig fields (--eval_limit, --eval_batch_size), with or without dashes
    p.add_argument("--eval_limit", "--eval-limit", "--limit", dest="limit", type=int,
                   help="first N validation examples per task")
    p.add_argument("--eval_batch_size", "--eval-batch-size", "--batch_size", dest="batch_size", type=int,
                   default=Config.batch_size, help=f"examples decoded at once (default {Config.batch_size})")
    p.add_argument("--out", default=Config.out, help="folder for released_prompts.json (--tiny: OUT/tiny)")
    p.add_argument("--tiny", action="store_true", help="random tiny T5, a few examples, seconds (CI)")
    p.add_argument("--debug", action="store_true", help="show an error's traceback (also SPOT_DEBUG=1)")
    a = p.parse_args(argv)
    return Config(model=a.model, prompts=a.prompts, data=a.data, vocab=a.vocab, tasks=tuple(a.tasks),
                  limit=a.limit, batch_size=a.batch_size, out=common.tiny_out(a.out, a.tiny), tiny=a.tiny)


def main(argv=None):
    cfg = parse_args(argv)
    print(spot.device_summary(), flush=True)
    cfg, model_cfg, params, prompts, vocab = tiny_setup(cfg) if cfg.tiny else setup(cfg)
    results = [evaluate_task(t, params, model_cfg, prompts[t], vocab, cfg) for t in cfg.tasks]
    print_table(results, cfg.tiny)
    # "paper" = the release notes' scores
    summary = {f"{r['task']}/{m}": {"mean": r["metrics"][m], "std": 0.0, "paper": v}
               for r in results for m, v in r["released"].items()}
    config = {**dataclasses.asdict(cfg), "input_format": "taskless",
              "model_config": dataclasses.asdict(model_cfg)}
    record = {"experiment": "released_prompts", "config": config, "results": results, "summary": summary}
    out = Path(cfg.out) / "released_prompts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    common.run_main(main)
