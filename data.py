"""Mixtures, batches, tasks, tokens and metrics of SPoT (Vu et al., ACL 2022) in T5's text-to-text form.
Paper -> code, in the file's order:
  §2.1 / App. B source mixtures, K = 2^19         MIXTURES, mixture_rates, mixture_batches
  §3.3 TOP-k MULTI-TASK MIXTURE                   retrieval.top_k_mixture_tasks, then mixture_batches
  batches made lazily, padded to length buckets   batches, bucket_length, permute, TextSource, ArraySource
  §2.1 tasks in T5 format, validation sets        TASKS, get_task, load_examples, to_text, text_pairs
  §2.1 frozen T5 1.1 vocabulary (32k + 100 ids)   load_vocab, tokenize, train_source
  §2.1 C4 prefix LM (T5 prefix_lm, token space)   PrefixLMSource, DocStream
  §2.1 footnote 5, T5 metric definitions          score
  the public files tests and --tiny read          fetch, data_root (python3 data.py fetch [NAME ...])
Formats, label strings and metrics follow T5's glue_utils/preprocessors/postprocessors and the official
SPoT task files (google-research/prompt-tuning, prompt_tuning/spot/data); 'our choice' marks the rest.
"""
import argparse
import csv
import functools
import gzip
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAD_ID, EOS_ID = 0, 1                     # T5's SentencePiece pad and end-of-sequence ids

NUM_SENTINELS = 100                       # <extra_id_0> = 32099 ... <extra_id_99> = 32000 (T5 vocabulary)
MIXING_CAP = 2 ** 19                      # K of examples-proportional mixing, SPoT §2.1
MAX_INPUT_LEN = 512                       # prompt-tuning/prompt_tuning/scripts/sst2-demo.sh: inputs 512
DEFAULT_VOCAB = "google/t5-base-lm-adapt"  # SPoT §2.1: LM-adapted T5 1.1; every size shares this vocabulary
TF_HINT = "pip install tensorflow-cpu   (or: pip install -e '.[tf]')"
GLUE_URL = "https://gluebenchmark.com/tasks (zips: https://dl.fbaipublicfiles.com/glue/data/<TASK>.zip)"
SUPERGLUE_URL = ("https://super.gluebenchmark.com/tasks "
                 "(zips: https://dl.fbaipublicfiles.com/glue/superglue/data/v2/)")


# --------------------------------------------------------------------------- the method: mixtures and batches
# Source mixtures of SPoT Appendix B. All = the 55 labeled datasets: overlaps once (SuperGLUE RTE has GLUE
# RTE's examples), GEM's XSum and WikiLingua apart from the Summarization ones. ANLI is one dataset in App. B
# and three tasks in the official code (prompt_tuning/spot/data/nli.py); each round is below K, so
# examples-proportional mixing gives the rounds together the rate ANLI pooled would have. MRQA: the official
# mrqa.py tasks.
MIXTURES = {
    "GLUE": ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"),
    "SuperGLUE": ("boolq", "cb", "copa", "multirc", "record", "superglue_rte", "wic", "wsc"),
    "NLI": ("anli_r1", "anli_r2", "anli_r3", "cb", "docnli", "mnli", "qnli", "rte", "snli"),
    "Paraphrase": ("cxc", "mrpc", "qqp", "stsb"),
    "Sentiment": ("cr", "goemotions", "sentiment140", "sst2", "yelp2"),
    "MRQA": ("mrqa_squad", "newsqa", "triviaqa", "searchqa", "hotpotqa", "naturalquestions"),
    "RAINBOW": ("abductive_nli", "cosmosqa", "hellaswag", "piqa", "socialiqa", "winogrande"),
    "Translation": ("wmt_ende", "wmt_enfr", "wmt_enro"),
    "Summarization": ("aeslc", "billsum", "cnn_dailymail", "wikilingua", "gigaword", "multi_news", "newsroom",
                      "samsum", "xsum"),
    "GEM": ("common_gen", "dart", "e2e_nlg", "schema_guided_dialog", "web_nlg", "wiki_auto", "gem_xsum",
            "gem_wikilingua"),
}
MIXTURES["All"] = tuple(dict.fromkeys(t for m in list(MIXTURES.values()) for t in m if t != "superglue_rte"))


def mixture_rates(sizes, cap=MIXING_CAP):
    """Examples-proportional mixing (Raffel et al. 2020 §3.5.2): r_m = min(n_m, K) / sum_n min(n_n, K)."""
    capped = {name: min(int(n), cap) for name, n in sizes.items()}
    total = sum(capped.values())
    return {name: n / total for name, n in capped.items()}


def mixture_batches(sources, batch_size, seed, start=0, rates=None, cap=MIXING_CAP, process_index=0,
                    process_count=1):
    """Infinite batches from a mixture of sources (any number of tasks): each row picks a task with the
    mixing rates, then an example of it uniformly (with replacement), so batch k depends only on (seed, k)
    and holds nothing but the batch. Padded to the bucket of the batch's longest row; process_index /
    process_count as in batches. sources: {task name: source} (a source as in batches)."""
    names, sizes = list(sources), {t: len(s) for t, s in sources.items()}
    rates = rates or mixture_rates(sizes, cap)
    p = np.array([rates[t] for t in names], np.float64)
    in_cap = max(s.max_input_len for s in sources.values())
    tgt_cap = max(s.max_target_len for s in sources.values())
    # A stream (C4 from its files) is read in order: its next rows follow the ones earlier batches took,
    # counted by replaying the earlier batches' task draws (about 20 us each).
    streams = [t for t, name in enumerate(names) if getattr(sources[name], "stream", False)]
    taken = np.zeros(len(names), np.int64)
    for j in range(start if streams else 0):
        drawn = np.random.default_rng([seed, j, 1]).choice(len(names), batch_size, p=p / p.sum())
        taken += np.bincount(drawn, minlength=len(names))
    k = start
    while True:
        rng = np.random.default_rng([seed, k, 1])
        which = rng.choice(len(names), size=batch_size, p=p / p.sum())
        inputs, targets = [None] * batch_size, [None] * batch_size
        for t, name in enumerate(names):
            slots = np.flatnonzero(which == t)
            if len(slots):
                idx = (taken[t] + np.arange(len(slots)) if t in streams
                       else rng.integers(sizes[name], size=len(slots)))
                taken[t] += len(slots)
                for i, x, y in zip(slots, *sources[name].rows(idx)):
                    inputs[i], targets[i] = x, y
        yield _collate(inputs, targets, in_cap, tgt_cap, process_index, process_count)
        k += 1


# Batch k is made when asked for, a pure function of (seed, k): its example indices, then those examples
# read, formatted, tokenized and padded to bucket lengths. Memory is O(batch), whatever the source's size.
# We write the index sampling (~40 lines of numpy) rather than depend on `grain`: a keyed bijection with
# cycle walking, as grain's index_shuffle (which uses the Simon cipher), and T5's mixing by independent
# random draws, in plain sight. A source is a TextSource, an ArraySource or a PrefixLMSource: len(source),
# source.rows(idx) -> (input id lists, target id lists), source.max_input_len, source.max_target_len.
def batches(source, batch_size, seed, start=0, process_index=0, process_count=1):
    """Infinite shuffled batches {'inputs': int32 [B,S], 'targets': int32 [B,T]} of a source, each padded to
    the bucket of its longest row (bucket_length). Batch k depends only on (seed, k), so a resumed run
    passes start=k; every epoch is a permutation of the examples. With process_count > 1, process
    process_index gets rows [i B/c, (i+1) B/c) of each global batch (jax.process_index/process_count)."""
    n = len(source)
    stream = getattr(source, "stream", False)       # a DocStream shuffles within its windows itself
    k = start
    while True:
        idx = k * batch_size + np.arange(batch_size) if stream else batch_rows(n, batch_size, seed, k)
        inputs, targets = source.rows(idx)
        yield _collate(inputs, targets, source.max_input_len, source.max_target_len,
                       process_index, process_count)
        k += 1


def bucket_length(n, cap):
    """Padded length of a batch whose longest sequence has n tokens: n rounded up to 4 lengths per octave
    (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, ..., 448, 512), never above cap.
    Why: SST-2 inputs have 22 tokens on average and 61 at p99, BoolQ 159 and 447 (T5 vocabulary), so padding
    to the batch's longest is what saves time (SST-2, B=32: 512 -> 55 on average); rounding that up to a
    bucket bounds the compiled step shapes at 25 for 512 tokens (5-7 per task over 100 batches of SST-2, RTE,
    BoolQ), and 4 per octave pads at most 25% (8% on average for all three) where 64-wide buckets pad SST-2 by
    36%; of the encoder's P + S positions that is 3-6% above the batch's longest."""
    n = max(int(n), 8)
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return min(int(cap), -(-n // step) * step)


_MIX = np.array([0xBF58476D1CE4E5B9, 0x94D049BB133111EB], np.uint64)


def _hash(x):
    """splitmix64's finaliser (Steele et al. 2014): uint64 array -> uint64 array; every output bit mixes all
    inputs. Not t5_model._mix32 (uint32, in jit, for dropout): one hash for both would change the data order
    or the dropout masks, so every README number."""
    x = (x ^ (x >> np.uint64(30))) * _MIX[0]
    x = (x ^ (x >> np.uint64(27))) * _MIX[1]
    return x ^ (x >> np.uint64(31))


def permute(pos, n, seed, epoch=0):
    """perm(pos): a pseudo-random permutation of [0, n), keyed by (seed, epoch), at the int positions pos,
    holding no index array: a 4-round Feistel network on 2h bits (4^h >= n) whose values past n walk on
    through it again (cycle walking, Black & Rogaway 2002; grain's index shuffle works alike). O(len(pos))
    time and memory for any n."""
    h = max(1, ((int(n) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    keys = _hash(_hash(_hash(np.array([seed], np.uint64)) + np.uint64(epoch)) + np.arange(4, dtype=np.uint64))
    x = np.asarray(pos, np.uint64).copy()
    todo = np.ones(x.shape, bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(h), x[todo] & mask
        for key in keys:
            left, right = right, left ^ (_hash(right ^ key) & mask)
        x[todo] = (left << np.uint64(h)) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def batch_rows(n, batch_size, seed, k):
    """Example indices of batch k: stream position p is perm_{p // n}(p % n), one permutation per epoch."""
    pos = k * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, within = pos // n, pos % n
    rows = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        rows[epoch == e] = permute(within[epoch == e], n, seed, int(e))
    return rows


def _collate(inputs, targets, in_cap, tgt_cap, process_index=0, process_count=1):
    """Rows -> int32 arrays padded to the bucket of the longest row (bucket_length). The bucket is the global
    batch's, so every process pads alike; process_index keeps its contiguous share of the rows (multi-host
    data parallelism)."""
    S = bucket_length(max(map(len, inputs)), in_cap)
    T = bucket_length(max(map(len, targets)), tgt_cap)
    n = len(inputs) // process_count
    mine = slice(process_index * n, (process_index + 1) * n)
    return {"inputs": pad_rows(inputs[mine], S), "targets": pad_rows(targets[mine], T)}


def token_ids(vocab, texts, length):
    """Token ids of each text, cut to length-1 and closed with EOS (T5 append_eos_after_trim); no padding."""
    return [list(vocab.encode(t))[:length - 1] + [EOS_ID] for t in texts]


def pad_rows(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for row, ids in zip(out, rows):
        row[:len(ids)] = ids[:length]
    return out


@dataclass(frozen=True, eq=False)
class TextSource:
    """A task's examples, tokenized only when a batch reads them. pairs[i] -> {'inputs', 'targets'} strings: a
    list (text_pairs) or a lazy sequence (load_pairs: tfds, generated sources); nothing else is held."""
    pairs: object                                # Sequence of {'inputs': str, 'targets': str}
    vocab: "Vocab"
    max_input_len: int = MAX_INPUT_LEN
    max_target_len: int = 8

    def __len__(self):
        return len(self.pairs)

    def rows(self, idx):
        """(input ids, target ids) of examples idx, each a list of unpadded id lists ending in EOS."""
        texts = [self.pairs[int(i)] for i in idx]
        return (token_ids(self.vocab, [t["inputs"] for t in texts], self.max_input_len),
                token_ids(self.vocab, [t["targets"] for t in texts], self.max_target_len))


@dataclass(frozen=True, eq=False)
class ArraySource:
    """Token arrays inputs [n,S] and targets [n,T], padded with 0 at the end (tokenize's output:
    ArraySource(**tokenize(...)); synthetic tasks): each batch trims its rows and pads them to its bucket."""
    inputs: np.ndarray
    targets: np.ndarray

    def __len__(self):
        return len(self.inputs)

    max_input_len = property(lambda self: self.inputs.shape[1])
    max_target_len = property(lambda self: self.targets.shape[1])

    def rows(self, idx):
        return unpad(self.inputs[idx]), unpad(self.targets[idx])


def unpad(a):
    """int [n, L] padded with 0 at the end (T5 pads only there) -> n lists of ids up to the last non-pad."""
    a = np.asarray(a)
    used = a != PAD_ID
    ends = np.where(used.any(1), a.shape[1] - np.argmax(used[:, ::-1], 1), 0)
    return [r[:e].tolist() for r, e in zip(a, ends)]


# ----------------------------------------------------------------------------------- task formats: T5 strings
# " ".join(parts) is T5's tf.strings.join(parts, separator=' '): no whitespace clean-up (glue/stsb/wsc/record)
def _collapse(text):
    """T5 `_string_join` tail: RE2 \\s+ -> ' ' (RE2's \\s is [\\t\\n\\f\\r ], ASCII only)."""
    return re.sub(r"[\t\n\f\r ]+", " ", text)


def _pad_punct(text):
    """T5 `_pad_punctuation`: spaces around each RE2 [[:punct:]] (ASCII punctuation, '_' too), then
    collapse. Letters outside ASCII stay whole:
    '"Introducción (la vídeo)".' -> ' " Introducción ( la vídeo ) " . '."""
    return _collapse(re.sub(r"([!-/:-@\[-`{-~])", r" \1 ", text))


# ------------------------------------------------------------------------------ task formats: example -> text
def fmt_glue(ex, prefix, fields, names, collapse=False):
    """T5 `glue`: "<prefix> k1: v1 k2: v2" (keys sorted unless given) -> label name, "<unk>" for label -1 (a
    test example; no names: the label itself). MultiRC drops HTML. collapse=True: the official SPoT
    `preprocess_text_classification`, whitespace collapsed."""
    text = " ".join([prefix] + [f"{k}: {ex[k]}" for k in fields or sorted(set(ex) - {"label", "idx"})])
    if prefix == "multirc":
        text = re.sub(r"<(/)?b>", "", text.replace("<br>", " "))
    label = ex["label"]
    return {"inputs": _collapse(text) if collapse else text,
            "targets": str(label) if names is None else "<unk>" if label == -1 else names[label]}


def fmt_stsb(ex, prefix="stsb", collapse=False):
    """T5 `stsb`: the score rounded to the nearest 0.2 and printed with one decimal, e.g. 1.8 -> "1.8"."""
    text = " ".join([f"{prefix} sentence1:", ex["sentence1"], "sentence2:", ex["sentence2"]])
    value = np.round(np.float32(ex["label"]) * np.float32(5)) / np.float32(5)   # tf.round: half to even
    return {"inputs": _collapse(text) if collapse else text, "targets": "%.1f" % value}


_WSC_SPECIAL = {
    'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out '
    'quite loud. "Good for him," he said. ':
        'The boy continued to whip the pony , and eventually the pony threw him over. John laughed out '
        'quite loud. "Good for X ," he said.',
    'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic '
    'pebble in an iron safe . Some day they might want to use it , but really for now, what more '
    'could they wish for?':
        'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic '
        'pebble in an iron safe . Some day they might want to use X , but really for now, what more '
        'could they wish for?'}


def fmt_wsc(ex):
    """T5 `wsc_simple`: "wsc: ... *pronoun* ..." -> the candidate referent (span1)."""
    words = ex["text"].split(" ")
    i = ex["span2_index"]
    text = " ".join([" ".join(words[:i]), "X", " ".join(words[i + 1:])])
    # The two WSC texts whose span2_index points at the wrong word: T5 matches the whole text exactly (other
    # texts share their first sentence, e.g. '... "Served him right," he said.', and keep the general rule).
    text = _WSC_SPECIAL.get(ex["text"], text)
    return {"inputs": "wsc: " + text.replace(" X ", f" *{ex['span2_text']}* "), "targets": ex["span1_text"]}


def fmt_record(ex, answer=0):
    """T5 `record`: "record query: Q entities: e1, e2 passage: P" -> an answer (the first; see text_pairs)."""
    passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", ex["passage"])
    passage = passage.replace("\n@highlight\n", ". ")
    text = " ".join(["record query:", ex["query"], "entities:", ", ".join(ex["entities"]), "passage:",
                     passage])
    return {"inputs": text, "targets": ex["answers"][answer] if ex["answers"] else "<unk>"}


def fmt_qa(ex, prefix=None):
    """Official SPoT `mrqa` (T5 `squad` with the task name first): "<task> question: q context: c" -> the
    first answer, punctuation padded. prefix=None gives T5's own squad format, with no task name."""
    parts = ["question:", _pad_punct(ex["question"]), "context:", _pad_punct(ex["context"])]
    return {"inputs": _collapse(" ".join([prefix, *parts] if prefix else parts)),
            "targets": _pad_punct(ex["answers"][0])}


def fmt_generate(ex, prefix, source, target, instruction=None, sep=" \\n "):
    """SPoT `preprocess_text_generation`: "<task> [<instruction>] <source>" -> target.
    A source that is a list is joined by sep."""
    src = ex[source] if isinstance(ex[source], str) else sep.join(ex[source])
    return {"inputs": " ".join([p for p in (prefix, instruction, src) if p]), "targets": ex[target]}


_LANG = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


def fmt_translate(ex, src, tgt):
    """T5 `translate`: "translate English to German: <en>" -> <de>."""
    return {"inputs": f"translate {_LANG[src]} to {_LANG[tgt]}: {ex[src]}", "targets": ex[tgt]}


def fmt_prefix_lm(ex):
    """Prefix LM on C4 (Raffel et al. 2020 §3.3.1): a random prefix is the input, the rest the target.
    T5 cuts in token space at a point uniform in [1, n-1]; we cut between words, seeded by the text."""
    words = ex["text"].split()
    if len(words) < 2:
        return {"inputs": "", "targets": ex["text"]}
    cut = int(np.random.default_rng(zlib.crc32(ex["text"].encode())).integers(1, len(words)))
    return {"inputs": " ".join(words[:cut]), "targets": " ".join(words[cut:])}


# --------------------------------------------------------------------------- task formats: record -> examples
def _race(ex):        # one article with many questions -> one example per question; options become A..D
    return [{"article": ex["article"], "question": q, **dict(zip("ABCD", opts)), "label": "ABCD".find(a)}
            for q, a, opts in zip(ex["questions"], ex["answers"], ex["options"])]


# ------------------------------------------------------------------------------------------ the task registry
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


@dataclass(frozen=True, eq=False)
class Task:
    """One task: where its data is, how an example becomes text, and how predictions are scored."""
    name: str
    preprocess: Callable[[dict], dict]          # example -> {'inputs': str, 'targets': str} (evaluation form)
    label_names: tuple | None = None
    metrics: tuple = ("accuracy",)
    kind: str = "class"                          # class | float | multirc | wsc | qa | record | text | lm
    tfds_name: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: dict(SPLITS))   # our split -> tfds split
    reader: str | None = None                    # offline reader for the creators' files (see READERS)
    files: Mapping[str, str] = field(default_factory=dict)                   # our split -> relative path
    layout: tuple = ()                           # reader-specific column layout
    source: str = ""                             # where to get the data
    needs_tf: bool = False                       # tfds 4.9.10 builds this builder only with TensorFlow
    adapt: Callable | None = None                # raw record -> list of flat examples
    target_len: int = 8                          # prompt-tuning scripts/sst2-demo.sh: targets 8

    @property
    def output_labels(self):
        """The label strings the model learns to output (rank classification, class_labels init), or None
        (WSC's label names only read the files' True/False labels: its target is the referent's text)."""
        return self.label_names if self.kind in ("class", "multirc") else None


def _glue_task(name, folder, layout, names, metrics=("accuracy",), fields=None, kind="class", files=None,
               **kw):
    files = files or {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    fmt = fmt_stsb if kind == "float" else functools.partial(
        fmt_glue, prefix=name, fields=fields, names=names)
    return Task(name, fmt, names, metrics, kind, f"glue/{name}", reader="glue_tsv", layout=layout,
                files={s: f"{folder}/{f}" for s, f in files.items()}, source=GLUE_URL, **kw)


def _sg_task(name, folder, layout, names, metrics=("accuracy",), fields=None, prefix=None, fmt=None, **kw):
    fmt = fmt or functools.partial(fmt_glue, prefix=prefix or name, fields=fields, names=names)
    needs_tf = folder not in ("MultiRC", "ReCoRD")   # tfds text/super_glue.py: _info needs TF but for these
    cfg = {"WSC": "wsc.fixed", "RTE": "rte"}.get(folder, name)
    files = {s: f"{folder}/{s[:3] if s == 'validation' else s}.jsonl" for s in SPLITS}   # dev file: val.jsonl
    return Task(name, fmt, names, metrics, tfds_name=f"super_glue/{cfg}", reader="superglue_jsonl",
                layout=layout, files=files, source=SUPERGLUE_URL, needs_tf=needs_tf, **kw)


def _cls_task(name, tfds_name, fields, names, prefix=None, **kw):
    return Task(name, functools.partial(fmt_glue, prefix=prefix or name, fields=fields, names=names,
                                        collapse=True), names, tfds_name=tfds_name, **kw)


def _qa_task(name, tfds_name, prefix=None, **kw):
    return Task(name, functools.partial(fmt_qa, prefix=prefix), None, ("squad",), "qa", tfds_name,
                target_len=32, **kw)                                                   # 32: our choice


def _gen_task(name, tfds_name, src, tgt, instruction=None, prefix=None, **kw):
    fmt = functools.partial(fmt_generate, prefix=prefix or name, source=src, target=tgt,
                            instruction=instruction)
    return Task(name, fmt, None, ("rouge",), "text", tfds_name, target_len=128, **kw)        # 128: our choice


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")
_POSNEG = ("negative", "positive")
_DIGITS = tuple("0123")
_MNLI_FILES = {"train": "train.tsv", "validation": "dev_matched.tsv", "validation_matched": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
               "test_mismatched": "test_mismatched.tsv"}
_MNLI_SPLITS = {s: ("validation_matched" if s == "validation" else s) for s in _MNLI_FILES}
_SUM = "summarize:"
_WIKILINGUA = ("https://github.com/esdurmus/Wikilingua (GEM English split: "
               "https://huggingface.co/datasets/GEM/wiki_lingua); "
               "save <split>.jsonl with fields source, target")

TASKS = [
    # GLUE (T5 glue_utils). Layout: (has header, ((feature, column), ...), label column).
    _glue_task("cola", "CoLA", (False, (("sentence", 3),), 1), ("unacceptable", "acceptable"), ("mcc",)),
    _glue_task("sst2", "SST-2", (True, (("sentence", "sentence"),), "label"), _POSNEG),
    _glue_task("mrpc", "MRPC", (True, (("sentence1", "#1 String"), ("sentence2", "#2 String")), "Quality"),
               ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    _glue_task("qqp", "QQP", (True, (("question1", "question1"), ("question2", "question2")), "is_duplicate"),
               ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    _glue_task("stsb", "STS-B", (True, (("sentence1", "sentence1"), ("sentence2", "sentence2")), "score"),
               None, ("pearson", "spearman"), kind="float"),
    _glue_task("mnli", "MNLI", (True, (("premise", "sentence1"), ("hypothesis", "sentence2")), "gold_label"),
               _NLI3, files=_MNLI_FILES, splits=_MNLI_SPLITS),
    _glue_task("qnli", "QNLI", (True, (("question", "question"), ("sentence", "sentence")), "label"), _NLI2),
    _glue_task("rte", "RTE", (True, (("sentence1", "sentence1"), ("sentence2", "sentence2")), "label"),
               _NLI2),
    _glue_task("wnli", "WNLI", (True, (("sentence1", "sentence1"), ("sentence2", "sentence2")), "label"),
               ("not_entailment", "entailment")),
    # SuperGLUE (T5 glue_utils; WSC as T5's wsc_simple on wsc.fixed). Layout: the tfds features.
    _sg_task("boolq", "BoolQ", ("question", "passage"), _BOOL),
    _sg_task("cb", "CB", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
             ("mean3f1", "accuracy")),
    _sg_task("copa", "COPA", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2")),
    _sg_task("multirc", "MultiRC", (), _BOOL,
             ("multirc",), ("question", "answer", "paragraph"), kind="multirc"),
    _sg_task("record", "ReCoRD", (), None, ("record",), fmt=fmt_record, kind="record", target_len=32),
    _sg_task("superglue_rte", "RTE", ("premise", "hypothesis"), _NLI2, prefix="rte"),
    _sg_task("wic", "WiC", ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"), _BOOL,
             fields=("sentence1", "sentence2", "word")),
    _sg_task("wsc", "WSC", ("text", "span1_index", "span2_index", "span1_text", "span2_text"), _BOOL,
             fmt=fmt_wsc, kind="wsc", target_len=16),                                   # 16: our choice
    # NLI (official SPoT nli.py: hypothesis first).
    _cls_task("docnli", "doc_nli", ("hypothesis", "premise"), ("not_entailment", "entailment"), "doc_nli",
              reader="records", files={"train": "train.json", "validation": "dev.json", "test": "test.json"},
              source="https://github.com/salesforce/DocNLI (DocNLI_dataset.zip: "
                     "train.json, dev.json, test.json)"),
    _cls_task("snli", "snli", ("hypothesis", "premise"), _NLI3),
    # ANLI: the official code registers each round as a task with its own name (spot_anli_r1 ...).
    *[_cls_task(f"anli_r{r}", f"anli/r{r}", ("hypothesis", "context"), _NLI3) for r in (1, 2, 3)],
    # Sentiment (official SPoT sentiment.py). Yelp-2 and Sentiment140 have no validation split: use test.
    _cls_task("yelp2", "yelp_polarity_reviews", ("text",), _POSNEG, "yelp_polarity_reviews",
              splits={"train": "train", "validation": "test", "test": "test"}),
    _cls_task("cr", None, ("text",), _POSNEG,
              reader="records", files={"train": "CR/train.tsv", "validation": "CR/validation.tsv"},
              source="Hu & Liu 2004 customer reviews, e.g. SentEval data/downstream/CR "
                     "(https://github.com/facebookresearch/SentEval); write CR/<split>.tsv with header "
                     "index<TAB>text<TAB>label (the layout the official SPoT code reads)"),
    _cls_task("sentiment140", "sentiment140", ("text",), ("negative", "neutral", "positive"),
              splits={"train": "train", "validation": "test", "test": "test"},          # polarity 0 / 2 / 4
              adapt=lambda ex: [{"text": ex["text"], "label": {0: 0, 2: 1, 4: 2}.get(ex["polarity"], -1)}]),
    # GoEmotions is multi-label: target = the true emotion names, comma separated (our choice).
    _cls_task("goemotions", "goemotions", ("comment_text",), None, kind="text", needs_tf=True,
              adapt=lambda ex: [{"comment_text": ex["comment_text"],
                                 "label": ", ".join(k for k, v in ex.items() if v is True)}]),
    # Paraphrase / similarity. CxC: official SPoT similarity.py (STS-B format, accuracy of the rounded score).
    Task("cxc", functools.partial(fmt_stsb, prefix="cxc", collapse=True), None, ("accuracy",), "float",
         reader="records", files={"train": "CxC/train.tsv", "validation": "CxC/validation.tsv"},
         source="https://github.com/google-research-datasets/Crisscrossed-Captions; write CxC/<split>.tsv "
                "with header index<TAB>sentence1<TAB>sentence2<TAB>label "
                "(the layout the official SPoT code reads)"),
    # QA. MRQA: official SPoT mrqa.py, "<task> question: ... context: ..." on tfds mrqa/<task> (its names).
    *[_qa_task(n, f"mrqa/{c}", prefix=c) for n, c in [
        ("mrqa_squad", "squad"), ("newsqa", "news_qa"), ("triviaqa", "trivia_qa"), ("searchqa", "search_qa"),
        ("hotpotqa", "hotpot_qa"), ("naturalquestions", "natural_questions")]],
    # SQuAD alone (Table 1 row, Table 2 source): Table 2's 88K examples are squad/v1.1's 87,599, not
    # mrqa/squad's 86,588, so it reads squad/v1.1, in the official squad task's format.
    _qa_task("squad", "squad/v1.1", prefix="squad",
             adapt=lambda ex: [{**ex, "answers": list(ex["answers"]["text"])}]),
    _qa_task("drop", "drop", splits={"train": "train", "validation": "dev"},                # T5 squad format
             adapt=lambda ex: [{**{k: ex[k] for k in ("question", "query_id")}, "context": ex["passage"],
                                "answers": [ex["answer"], *ex["validated_answers"]]}]),
    # Commonsense / multiple choice: "<task> k: v ..." -> the tfds label name (our choice, after T5's COPA).
    _cls_task("winogrande", "winogrande", ("sentence", "option1", "option2"), ("1", "2"),
              splits={"train": "train_xl", "validation": "validation", "test": "test"}),
    _cls_task("hellaswag", "hellaswag", ("context", "ending0", "ending1", "ending2", "ending3"), _DIGITS,
              adapt=lambda ex: [{**{k: v for k, v in ex.items() if k != "endings"},
                                 **{f"ending{i}": e for i, e in enumerate(ex["endings"])}}]),
    _cls_task("cosmosqa", "cosmos_qa", ("context", "question", "answer0", "answer1", "answer2", "answer3"),
              _DIGITS, "cosmos_qa"),
    _cls_task("piqa", "piqa", ("goal", "sol1", "sol2"), _DIGITS[:2]),
    _cls_task("socialiqa", None, ("context", "question", "answerA", "answerB", "answerC"), ("1", "2", "3"),
              reader="records", files={"train": "socialiqa/train.jsonl", "validation": "socialiqa/dev.jsonl"},
              source="https://leaderboard.allenai.org/socialiqa (socialiqa-train-dev.zip: "
                     "train.jsonl, train-labels.lst, dev.jsonl, dev-labels.lst)"),
    _cls_task("abductive_nli", None, ("obs1", "obs2", "hyp1", "hyp2"), ("1", "2"),
              reader="records", files={"train": "alphanli/train.jsonl", "validation": "alphanli/dev.jsonl"},
              source="https://leaderboard.allenai.org/anli (alphanli-train-dev.zip: "
                     "train.jsonl, train-labels.lst, dev.jsonl, dev-labels.lst)"),
    # RACE: Table 2's 25K training questions match RACE-middle (25,421); race/high has 62K.
    _cls_task("race", "race/middle", ("article", "question", "A", "B", "C", "D"), tuple("ABCD"), adapt=_race),
    # Translation (T5 tasks.py: wmt_t2t de-en, wmt14 fr-en, wmt16 ro-en; BLEU).
    *[Task(f"wmt_en{lang}", functools.partial(fmt_translate, src="en", tgt=lang), None, ("bleu",), "text", t,
           target_len=128) for lang, t in [
        ("de", "wmt_t2t_translate/de-en"), ("fr", "wmt14_translate/fr-en"), ("ro", "wmt16_translate/ro-en")]],
    # Summarization (official SPoT summarization.py: "<task> summarize: <source>", ROUGE).
    *[_gen_task(n, n, s, t, _SUM) for n, s, t in [
        ("aeslc", "email_body", "subject_line"), ("billsum", "text", "summary"),
        ("cnn_dailymail", "article", "highlights"), ("gigaword", "document", "summary"),
        ("multi_news", "document", "summary"), ("newsroom", "text", "summary"),
        ("samsum", "dialogue", "summary"), ("xsum", "document", "summary")]],
    _gen_task("wikilingua", None, "source", "target", _SUM,
              reader="records", source=_WIKILINGUA, files={s: f"wikilingua/{s}.jsonl" for s in SPLITS}),
    # GEM (SPoT's unreleased gem.py: "<task> [instruction] <source>"; list inputs joined by " \n ").
    *[_gen_task(n, f"gem/{c}", s, "target", i, prefix=c) for n, c, s, i in [
        ("common_gen", "common_gen", "concepts", None), ("dart", "dart", "tripleset", None),
        ("e2e_nlg", "e2e_nlg", "meaning_representation", None),
        ("schema_guided_dialog", "schema_guided_dialog", "prompt", None),   # source = the prompt (our choice)
        ("web_nlg", "web_nlg_en", "input", None),
        ("wiki_auto", "wiki_auto_asset_turk", "source", "simplify:"),
        ("gem_xsum", "xsum", "document", _SUM)]],
    _gen_task("gem_wikilingua", None, "source", "target", _SUM, prefix="wiki_lingua_english_en",
              reader="records", source=_WIKILINGUA, files={s: f"gem_wikilingua/{s}.jsonl" for s in SPLITS}),
    # C4 with the prefix-LM objective: the unsupervised source (SPoT §2.1, Table 2). No metric.
    Task("c4", fmt_prefix_lm, None, (), "lm", "c4/en", target_len=128),                 # 128: our choice
]
_REGISTRY = {re.sub(r"[^a-z0-9.]", "", t.name.lower()): t for t in TASKS}


class UnknownTask(KeyError):
    """A name that is neither a task nor a mixture; str() is the message itself (a KeyError's is its repr)."""

    def __str__(self):
        return str(self.args[0])


def get_task(name):
    """Task by name; case, '-', '_', ' ' and '/' are ignored ('STS-B' -> stsb, 'Yelp-2' -> yelp2)."""
    task = _REGISTRY.get(re.sub(r"[^a-z0-9.]", "", str(name).lower()))
    if task is None:
        raise UnknownTask(f"unknown task {name!r} (--task); tasks: {', '.join(t.name for t in TASKS)}; "
                          f"mixtures: {', '.join(MIXTURES)}")
    return task


def task_names(name):
    """--task as (mixture name or None, its task names): a mixture of MIXTURES (any case) or one task.
    Example: task_names('glue') -> ('GLUE', ('cola', 'sst2', ...)); task_names('STS-B') -> (None, ('stsb',))
    """
    mixture = next((m for m in MIXTURES if m.lower() == str(name).lower()), None)
    return (mixture, MIXTURES[mixture]) if mixture else (None, (get_task(name).name,))


# ------------------------------------------------------------------------------------- loading: tfds or files
def load_examples(task_name, split, data_dir=None, tfds_dir=None, download=True):
    """Examples of one split as plain dicts: via tfds when data_dir is None, else from the creators' files.
    Both paths give the tfds field names and integer labels (class index, -1 = no label). tfds_dir and
    download go to tfds.data_source (download=False: fail at once when the data is not prepared)."""
    task = get_task(task_name)
    if data_dir is not None and task.reader is None:
        raise FileNotFoundError(f"{task.name} has no reader for local files: load it through tfds "
                                f"({task.tfds_name}) with data_dir=None")
    if data_dir is not None and split not in task.files:
        raise ValueError(f"{task.name} has no split {split!r} on the files path; known: {sorted(task.files)}")
    if data_dir is None:
        ds = _tfds_source(task, split, tfds_dir, download)
        raw = [_plain(ds[i]) for i in range(len(ds))]
    else:
        raw = _file_examples(task, split, data_dir)
    examples = [y for x in raw for y in task.adapt(x)] if task.adapt else list(raw)
    if not examples:
        raise ValueError(f"{task.name} split {split!r} is empty; "
                         f"check the data ({task.source or task.tfds_name})")
    return examples


def _plain(x):
    """tfds values -> Python: bytes -> str (array_record gives bytes, mock_data str), arrays -> lists/scalars.
    Sequence features (ReCoRD entities/answers, SQuAD answers ...) come back as lists of bytes."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or isinstance(x, np.ndarray) and x.ndim:
        return [_plain(v) for v in x]
    x = x.item() if isinstance(x, (np.ndarray, np.generic)) else x
    return x.decode("utf-8") if isinstance(x, bytes) else x


def _tfds_source(task, split, tfds_dir, download):
    """The tfds random-access data source (array_record) of one split."""
    if split not in task.splits:
        raise ValueError(f"{task.name} has no split {split!r} on the tfds path; known: {sorted(task.splits)}")
    if task.tfds_name is None:
        raise FileNotFoundError(f"tfds has no {task.name}; get the original files from {task.source} "
                                f"and pass --data DIR (holding {sorted(set(task.files.values()))})")
    if task.needs_tf and importlib.util.find_spec("tensorflow") is None:
        alt = f"; or read the original files with --data DIR ({task.source})" if task.reader else ""
        raise ModuleNotFoundError(f"tfds 4.9.10 builds {task.tfds_name} only with TensorFlow "
                                  f"(its features use tf dtypes): {TF_HINT}{alt}")
    # The submodules register glue, super_glue & co. without TensorFlow (tfds 4.9, tested here); `import
    # tensorflow_datasets` alone does not.
    import tensorflow_datasets as tfds
    for module in ("question_answering", "summarization", "text", "translate"):
        importlib.import_module("tensorflow_datasets." + module)
    folder = {GLUE_URL: "glue", SUPERGLUE_URL: "superglue"}.get(task.source)   # what fetch caches
    name, files = task.tfds_name, (f"pass --data DIR, a folder with {task.name}'s original files" + (
        f" (`{FETCH_HINT} {folder}` caches them: --data {data_root() / folder})" if folder
        else f" ({task.source or 'see the tfds catalog'})"))
    # array_record: the only tfds file format that is written and read without TensorFlow
    load = functools.partial(tfds.data_source, name, split=task.splits[split], data_dir=tfds_dir,
                             builder_kwargs={"file_format": "array_record"})
    for fetching in (False, True) if download else (False,):     # prepared already: no network needed
        if fetching and not online():       # offline: tfds would retry its downloads for minutes
            raise ConnectionError(f"tfds has not prepared {name} and the network is unreachable: {files}")
        try:
            return load(download=fetching)
        except Exception as e:  # noqa: BLE001 -- not prepared (KeyError, AssertionError...): manual download
            error = e
    why = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    raise OSError(f"tfds could not load {name} split {task.splits[split]!r} ({why}); "
                  f"{TF_HINT} if it asks for TensorFlow; else {files}")


def online(timeout=3.0, hosts=("storage.googleapis.com", "dl.fbaipublicfiles.com", "huggingface.co")):
    """Whether any host tfds downloads from accepts a connection within `timeout` seconds."""
    import socket
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            pass
    return False


class LazyPairs(Sequence):
    """pairs[i] = fn(i) for 0 <= i < n, made when read: a source of any size held as one function."""

    def __init__(self, n, fn):
        self.n, self.fn = int(n), fn

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:                     # Sequence's iteration stops at IndexError
            raise IndexError(f"index {i} of {self.n} examples")
        return self.fn(int(i) % self.n)


def load_pairs(task_name, split, data_dir=None, train=False, tfds_dir=None, download=True):
    """text_pairs of a split, for batches(TextSource(...)): a list from files (data_dir), else a LazyPairs
    reading example i from tfds' array_record files when a batch asks, so a split of any size (WMT14 en-fr:
    40.8M pairs) costs no memory. Tasks whose records expand (RACE; ReCoRD, WSC in training) load whole."""
    task = get_task(task_name)
    expands = task.adapt is _race or (train and task.kind in ("record", "wsc"))    # one record -> many pairs
    if data_dir is not None or expands:
        examples = load_examples(task_name, split, data_dir, tfds_dir, download)
        return text_pairs(task_name, examples, train=train)
    ds = _tfds_source(task, split, tfds_dir, download)

    def pair(i):
        ex = _plain(ds[i])
        return task.preprocess(task.adapt(ex)[0] if task.adapt else ex)       # adapt: one example per record
    return LazyPairs(len(ds), pair)


def data_fingerprint(task_name, split, data_dir=None, tfds_dir=None):
    """What a run reads, for resume checks: the file's name, size and sha256 (data_dir; about 1.3 s a GB), or
    tfds' dataset name, split and example count. C4's files (hundreds of GB): their count, bytes, and the
    sha256 of the first MiB of the first and the last MiB of the last."""
    task = get_task(task_name)
    if data_dir is None:
        ds = _tfds_source(task, split, tfds_dir, download=False)
        return {"tfds": task.tfds_name, "split": task.splits[split], "examples": [len(ds)]}
    files = _c4_files(data_dir) if task.kind == "lm" else [_find_file(task, split, data_dir)]
    sizes = {"file": files[0].name, "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    if task.kind != "lm":
        return {**sizes, "sha256": _sha256(files[0])[:16]}
    with open(files[0], "rb") as first, open(files[-1], "rb") as last:
        last.seek(max(0, files[-1].stat().st_size - (1 << 20)))
        ends = hashlib.sha256(first.read(1 << 20) + last.read(1 << 20))
    return {**sizes, "sha256_ends": ends.hexdigest()[:16]}


# ----------------------------------------------------------------------------- readers of the creators' files
def _find_file(task, split, data_dir):
    rel = Path(task.files[split])
    root = Path(data_dir).expanduser()
    tried = [root / rel, root / "glue" / rel, root / "superglue" / rel, root / rel.name]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{task.name} {split}: no {rel} under {root} "
                                f"(tried {', '.join(map(str, tried))}). "
                                f"Get the original files from {task.source}")
    return path


def _file_examples(task, split, data_dir):
    path = _find_file(task, split, data_dir)
    try:
        return READERS[task.reader](task, path)
    except (KeyError, IndexError, TypeError, ValueError, csv.Error) as e:   # incl. JSON and unicode errors
        raise ValueError(f"{task.name} {split}: {path} is not laid out like the original files "
                         f"({type(e).__name__}: {str(e)[:300]}). "
                         f"Pass the creators' unmodified files: {task.source}") from e


def _label(value, task):
    """A file's label as tfds stores it: class index (label name, digit string or bool), float for scores."""
    if value is None or value == "":
        return -1
    if task.kind == "float":
        return float(np.float32(value))
    names = task.label_names or ()
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        label = int(value)                                    # bool, int or digit string
    except (TypeError, ValueError):
        label = None
    if label is None or not -1 <= label < len(names):
        raise ValueError(f"label {value!r} is neither one of {names} nor a class index 0..{len(names) - 1} "
                         "(-1: no label)")
    return label


def _read_glue_tsv(task, path):
    """GLUE .tsv as tfds reads it: tab separated, no quoting, row number = idx; CoLA has no header, MRPC's
    header starts with a UTF-8 BOM; test files have no label (-1); rows missing a column are dropped."""
    header, cols, label_col = task.layout
    if not header and path.name.startswith("test"):          # CoLA's test.tsv does have a header
        header, cols = True, tuple((feat, feat) for feat, _ in cols)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = _tsv(f, header)
        missing = [c for _, c in cols if c not in (rows.fieldnames or ())] if header else []
        if missing:
            raise ValueError(f"no column {missing} in the header {rows.fieldnames} "
                             "(GLUE's tab-separated layout)")
        for n, row in enumerate(rows):
            get = row.get if header else (lambda c, r=row: r[c] if c < len(r) else None)
            ex = {feat: get(col) for feat, col in cols}
            raw = -1 if header and label_col not in row else get(label_col)
            if raw in (None, "") or any(v is None for v in ex.values()):
                continue                                     # tfds drops rows with a missing value
            try:
                out.append({**ex, "idx": n, "label": _label(raw, task)})
            except ValueError as e:
                raise ValueError(f"line {rows.line_num}: {e}") from e
    return out


def _tsv(f, header):
    """The rows of an open .tsv: tab separated, no quoting (as tfds reads GLUE). A field may be as long as the
    file: csv's default limit (128 KiB a field) would stop a long document."""
    csv.field_size_limit(max(csv.field_size_limit(), min(os.fstat(f.fileno()).st_size, 2 ** 31 - 1)))
    return (csv.DictReader if header else csv.reader)(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def _fix_wsc(ex):
    """tfds `wsc.fixed`: span texts made substrings of the text (first-word case, no final '.', no '\\n')."""
    for k in ("span1", "span2"):
        span, index = ex[k + "_text"], ex[k + "_index"]
        if span in ex["text"] or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in span:
            ex["span2_index"] = 10
        first = ex["text"].split()[index]
        span = (span[0].lower() if first[0].islower() else span[0].upper()) + span[1:]
        ex[k + "_text"] = span.rstrip(".").replace("\n", " ")
    return ex


def _read_superglue_jsonl(task, path):
    """SuperGLUE .jsonl flattened as tfds does: MultiRC one example per answer, ReCoRD one per query,
    WSC's target spans lifted to the top level (wsc.fixed); labels as class indices."""
    out = []
    with open(path, encoding="utf-8-sig") as f:                 # -sig: a byte order mark is dropped
        for n, line in enumerate(f, 1):
            try:                                                  # blank lines (a trailing one) are skipped
                out += _superglue_examples(task, json.loads(line)) if line.strip() else []
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"line {n}: {type(e).__name__}: {e}") from e
    return out


def _superglue_examples(task, row):
    """The tfds examples of one .jsonl record."""
    if task.kind == "multirc":
        p = row["passage"]
        return [{"paragraph": p["text"], "question": q["question"], "answer": a["text"],
                 "label": -1 if a.get("label") is None else int(bool(a["label"])),
                 "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]}}
                for q in p["questions"] for a in q["answers"]]
    if task.kind == "record":
        text = row["passage"]["text"]
        ents = sorted({text[e["start"]:e["end"] + 1] for e in row["passage"]["entities"]})
        return [{"passage": text, "query": qa["query"], "entities": ents,
                 "answers": sorted({a["text"] for a in qa.get("answers", [])}),
                 "idx": {"passage": row["idx"], "query": qa["idx"]}} for qa in row["qas"]]
    row.update(row.get("target", {}))
    ex = {k: row[k] for k in task.layout}
    ex = _fix_wsc(ex) if task.kind == "wsc" else ex
    return [{**ex, "idx": row["idx"], "label": _label(row.get("label"), task)}]   # COPA: 0/1 = choice1/2


def _read_records(task, path):
    """Other creators' files: .tsv with a header (SPoT's CR/CxC layout), a .json list (DocNLI) or .jsonl;
    labels come from the records or, for SocialIQa/alphaNLI, from the sibling <split>-labels.lst. Errors name
    the file's line (the .json list: the record), counted from 1."""
    unit = "line"                                             # rows: (line or record number, record)
    with open(path, encoding="utf-8-sig", newline="") as f:   # -sig: a byte order mark is dropped
        if path.suffix == ".tsv":
            reader = _tsv(f, header=True)
            rows = [(reader.line_num, r) for r in reader]
        elif path.suffix == ".json":
            rows, unit = json.load(f), "record"
            rows = list(enumerate(rows, 1)) if isinstance(rows, list) else rows
        else:
            rows = []
            for n, line in enumerate(f, 1):
                try:                                          # blank lines are skipped
                    rows += [(n, json.loads(line))] if line.strip() else []
                except ValueError as e:
                    raise ValueError(f"line {n}: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for _, r in rows):
        raise ValueError("expected records: a .tsv with a header, a .json list of objects or .jsonl objects")
    labels = path.with_name(path.stem + "-labels.lst")
    if task.label_names and rows and "label" not in rows[0][1]:
        if not labels.is_file():
            raise FileNotFoundError(f"{task.name}: labels file {labels} is missing; "
                                    f"get it from {task.source}")
        values = labels.read_text().split()
        if len(values) != len(rows):                  # zip would silently drop the unlabelled tail
            raise ValueError(f"{labels} has {len(values)} labels for the {len(rows)} records of {path.name}")
        rows = [(n, {**r, "label": lab}) for n, ((_, r), lab) in enumerate(zip(rows, values), 1)]
        unit = f"{labels} line"                       # a bad label is on that line of the .lst
    out = []
    for n, r in rows:
        try:
            out.append({**r, "label": _label(r["label"], task)} if "label" in r else r)
        except ValueError as e:
            raise ValueError(f"{unit} {n}: {e}") from e
    return out


READERS = {"glue_tsv": _read_glue_tsv, "superglue_jsonl": _read_superglue_jsonl, "records": _read_records}


def to_text(task_name, example):
    """One example -> {'inputs', 'targets'} strings exactly as T5 / the SPoT code write them."""
    return get_task(task_name).preprocess(example)


def text_pairs(task_name, examples, train=False):
    """to_text over a split. train=True applies T5's training-only rules: ReCoRD gives one pair per answer,
    WSC keeps only examples whose candidate is the true referent (wsc_simple correct_referent_only)."""
    task = get_task(task_name)
    if train and task.kind == "record":
        return [fmt_record(ex, i) for ex in examples for i in range(max(len(ex["answers"]), 1))]
    if train and task.kind == "wsc":
        examples = [ex for ex in examples if ex["label"] == 1]
    return [task.preprocess(ex) for ex in examples]


# ---------------------------------------------------------------------------------- the vocabulary and tokens
class Vocab:
    """T5's SentencePiece vocabulary: 32,000 pieces plus <extra_id_0..99> as ids 32099..32000.
    Example: encode("a <extra_id_0> b") -> [3, 9, 32099, 3, 115] (as seqio; no separate '▁' before it)."""

    def __init__(self, model_bytes, path=None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(model_bytes)
        # seqio SentencePieceVocabulary: user-defined pieces "▁<extra_id_i>"
        for i in reversed(range(NUM_SENTINELS)):
            piece = proto.pieces.add()
            piece.piece, piece.type = f"▁<extra_id_{i}>", pb.ModelProto.SentencePiece.USER_DEFINED
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.encode = self.sp.encode
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]   # what a resumed run must read alike
        self.vocab_size = self.sp.get_piece_size()          # 32100; checkpoints pad the embedding to 32128
        self.path = path                                    # named in errors (spot.check_vocab)

    def decode(self, ids):
        """Ids -> text up to the first EOS, pad dropped; ids past the vocabulary (the checkpoints' logits
        have 32128 rows) decode as unknown " ⁇ ", as in seqio, so they never vanish from a prediction."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
        return self.sp.decode([self.sp.unk_id() if i >= self.vocab_size else i for i in ids if i != PAD_ID])


def load_vocab(path_or_hub_id=None):
    """A .model file, a directory holding spiece.model, or a Hugging Face hub id (default: $SPOT_VOCAB, else
    DEFAULT_VOCAB). Cached per resolved reference, so a changed SPOT_VOCAB is seen."""
    return _load_vocab(str(path_or_hub_id or os.environ.get("SPOT_VOCAB", DEFAULT_VOCAB)))


def model_vocab(model, vocab=None):
    """The vocabulary of --model (spot.py and the scripts alike): --vocab when given, else a checkpoint
    folder's spiece.model, else for 'tiny' the fetch cache's t5_spiece.model, else load_vocab's default
    ($SPOT_VOCAB, else DEFAULT_VOCAB from the hub: every T5 1.1 size shares it)."""
    spiece, cached = Path(str(model)).expanduser() / "spiece.model", data_root() / "t5_spiece.model"
    tiny = model == "tiny" and not os.environ.get("SPOT_VOCAB") and cached.is_file()
    return load_vocab(vocab or (spiece if spiece.is_file() else cached if tiny else None))


@functools.lru_cache(maxsize=4)
def _load_vocab(ref):
    path = Path(ref)
    if path.is_dir():
        path = path / "spiece.model"
    if not path.is_file():
        if os.path.exists(ref) or ref.endswith(".model"):
            raise FileNotFoundError(f"no SentencePiece model at {path}: pass a .model file, a folder with "
                                    "spiece.model, or a hub id such as google/t5-base-lm-adapt")
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(ref, "spiece.model"))
        except Exception as e:  # offline, unknown repo, no permission: say how to use a local file
            raise OSError(f"could not fetch spiece.model of {ref!r} from the Hugging Face hub "
                          f"({type(e).__name__}: {str(e)[:200]}). Offline, pass a local file, "
                          "e.g. --vocab /path/to/t5_spiece.model, or set SPOT_VOCAB to it") from e
    from google.protobuf.message import DecodeError
    try:
        return Vocab(path.read_bytes(), path)
    except (DecodeError, RuntimeError) as e:   # protobuf, then sentencepiece: a .npy, a text or empty file
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ValueError(f"{path} is not a SentencePiece model ({why}): pass T5's spiece.model (a .model "
                         "file, a folder holding it, or a hub id such as google/t5-base-lm-adapt)") from None


def tokenize(vocab, texts, max_input_len=MAX_INPUT_LEN, max_target_len=8):
    """[{'inputs','targets'}] -> {'inputs': int32 [n,S], 'targets': int32 [n,T]}: each sequence cut to
    length-1, then EOS (T5's append_eos_after_trim), then padded with 0."""
    return {key: pad_rows(token_ids(vocab, [t[key] for t in texts], length), length)
            for key, length in (("inputs", max_input_len), ("targets", max_target_len))}


# ------------------------------------------------------------------------------ sources too large to hold: C4
class DocStream(Sequence):
    """The documents of a source too large to index or read at random (C4: 365M documents in 1024 .json.gz
    files), read in order and shuffled within windows: docs[p] is document perm_w(p % window) of window
    w = p // window, perm_w keyed by (seed, w); it holds one window. Positions past the end wrap around.
    open_docs(start) -> iterator over the document texts from document `start` on."""
    stream = True                                   # batches take positions k*B ... in order (no epochs)

    def __init__(self, open_docs, seed=0, window=4096):
        self.open_docs, self.seed, self.window = open_docs, seed, window
        self.total, self._w, self._docs, self._it, self._next = None, None, [], None, 0

    def __len__(self):
        return self.total or 2 ** 62

    def _read(self, w):
        """Window w's documents: skip forward in the open iterator (or reopen it to go back)."""
        first = w * self.window
        if self._it is None or first < self._next:
            self._it, self._next = iter(self.open_docs(first)), first
        for _ in range(first - self._next):            # documents read and dropped, not tokenized
            next(self._it, None)
        self._docs = list(itertools.islice(self._it, self.window))
        self._w, self._next = w, first + len(self._docs)
        if len(self._docs) < self.window:              # the end: now the stream's length is known
            self.total = first + len(self._docs)
            if not self.total:
                raise IndexError("the document stream is empty")

    def __getitem__(self, p):
        p = int(p) % self.total if self.total else int(p)
        w = p // self.window
        if w != self._w:
            self._read(w)
        if p % self.window >= len(self._docs):         # past the end, found just now
            return self[p]
        return self._docs[int(permute(np.array([p % self.window]), len(self._docs), self.seed, w)[0])]


@dataclass(frozen=True, eq=False)
class PrefixLMSource:
    """C4 with T5's prefix-LM objective in token space (Raffel et al. 2020 §3.3.1; T5 preprocessors.prefix_lm:
    select_random_chunk, split_tokens_to_inputs_length, random_prefix_noise_mask at noise density 0.5).
    Example i: a random chunk of at most 65,536 tokens of docs[i], split into segments of max_input_len - 1
    tokens, one kept at random (our choice: T5 keeps all, so the example count is unknown until every
    document is tokenized); its first n tokens, n uniform in [1, length - 1], are the input, the rest the
    target. All draws are keyed by (seed, i)."""
    docs: object                                # Sequence of document texts (or a DocStream)
    vocab: "Vocab"
    max_input_len: int = MAX_INPUT_LEN
    max_target_len: int = 128
    seed: int = 0
    chunk: int = 65536                          # T5 select_random_chunk max_length for prefix_lm

    stream = property(lambda self: getattr(self.docs, "stream", False))

    def __len__(self):
        return len(self.docs)

    def example_ids(self, i):
        ids = list(self.vocab.encode(self.docs[int(i)]))
        rng = np.random.default_rng([self.seed, int(i), 2])
        if len(ids) > self.chunk:
            ids = ids[self.chunk * rng.integers(-(-len(ids) // self.chunk)):][:self.chunk]
        width = self.max_input_len - 1
        seg = ids[width * rng.integers(max(1, -(-len(ids) // width))):][:width]
        n = int(rng.integers(1, len(seg))) if len(seg) >= 2 else len(seg)   # [1, L-1]; L < 2: all input
        return seg[:n] + [EOS_ID], seg[n:][:self.max_target_len - 1] + [EOS_ID]

    def rows(self, idx):
        pairs = [self.example_ids(i) for i in idx]
        return [x for x, _ in pairs], [y for _, y in pairs]


def train_source(task_name, vocab, max_input_len=MAX_INPUT_LEN, max_target_len=0, data_dir=None, seed=0,
                 tfds_dir=None, download=True):
    """A task's training examples for batches / mixture_batches, read and tokenized per batch: a TextSource
    over load_pairs, or for C4 a PrefixLMSource over its documents (tfds c4/en in array_record: read at
    random; data_dir: the allenai/c4 .json.gz files under c4/en/ or en/, streamed in order by a DocStream)."""
    task = get_task(task_name)
    T = max_target_len or task.target_len
    if task.kind != "lm":
        pairs = load_pairs(task_name, "train", data_dir, True, tfds_dir, download)
        return TextSource(pairs, vocab, max_input_len, T)
    if data_dir is None:
        ds = _tfds_source(task, "train", tfds_dir, download)
        docs = LazyPairs(len(ds), lambda i: _plain(ds[i])["text"])
    else:  # allenai/c4's .json.gz: one JSON object per line, with a 'text' field
        files = _c4_files(data_dir)

        def open_docs(start):  # DocStream skips forward to `start` itself
            for path in files:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    yield from (json.loads(line)["text"] for line in f)
        docs = DocStream(open_docs, seed)
    return PrefixLMSource(docs, vocab, max_input_len, T, seed)


def _c4_files(data_dir):
    root = Path(data_dir).expanduser()
    found = (sorted((root / sub).glob("c4-train.*.json.gz")) for sub in ("c4/en", "en", "."))
    files = next((f for f in found if f), [])
    if not files:
        raise FileNotFoundError(f"c4: no c4-train.*.json.gz under {root}/c4/en, {root}/en or {root}; "
                                "get them from https://huggingface.co/datasets/allenai/c4 (en/), "
                                "or use tfds c4/en")
    return files


# ------------------------------------------------------------------------------------ predictions and metrics
# The determiners of T5 postprocessors.wsc_simple (google-research/text-to-text-transfer-transformer,
# t5/data/postprocessors.py).
_DETERMINERS = {"a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some", "that",
                "the", "their", "these", "this", "those", "which", "whose", "your"}


def postprocess(task_name, prediction, example=None):
    """A decoded string -> what the metric compares (T5 postprocessors): class index (-1 if unknown), float
    (-1.0 if not a number), WSC 1/0 = "names the candidate" (-1: only determiners), else the string itself."""
    task = get_task(task_name)
    if task.kind in ("class", "multirc"):
        return task.label_names.index(prediction) if prediction in task.label_names else -1
    if task.kind == "float":
        try:
            return float(prediction)
        except ValueError:
            return -1.0
    if task.kind == "wsc":   # T5 postprocessors.wsc_simple: does the prediction name the candidate referent?
        def clean(s):        # ignore case and determiners
            return " ".join(w for w in s.strip().lower().split(" ") if w not in _DETERMINERS)
        pred = clean(prediction)
        if not pred:         # nothing left: -1, so an empty answer never matches the label 0 (False)
            return -1
        ref = clean(task.preprocess(example)["targets"])     # T5: the target text, targets_pretokenized
        if ("'" in pred) != ("'" in ref):                    # "Bob" does not name "Bob's hat"
            return 0
        pw, rw = set(pred.split(" ")), set(ref.split(" "))
        return int(pw <= rw or rw <= pw)                     # "fuzzy bunny" names "bunny" and vice versa
    return prediction


def _target(task, ex):
    if task.kind in ("class", "float", "text"):      # seqio postprocesses the target string too
        return postprocess(task.name, task.preprocess(ex)["targets"], ex)
    if task.kind == "multirc":
        return ex["label"], (ex["idx"]["paragraph"], ex["idx"]["question"])
    if task.kind == "record":
        return ex["answers"], (ex["idx"]["passage"], ex["idx"]["query"])
    if task.kind == "qa":
        return [_pad_punct(a) for a in ex["answers"]]
    return ex["label"]                                 # wsc


def _unlabeled(task, ex):
    """True for a test-split example: label -1 (tfds) or no reference answers."""
    if task.kind in ("record", "qa"):
        return not ex["answers"]
    return task.kind in ("class", "float", "multirc", "wsc") and ex.get("label") == -1


def accuracy(targets, preds):
    return {"accuracy": 100 * float(np.mean([t == p for t, p in zip(targets, preds)]))}


def _f1(t, p, c):
    """F1 of class c, targets t and predictions p arrays; 0 when c is neither a target nor predicted."""
    tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def f1_with_invalid(targets, preds):
    """Binary F1 of class 1 (T5 f1_score_with_invalid): a prediction other than 0/1 counts as wrong."""
    t, p = np.asarray(targets), np.asarray(preds).copy()
    bad = (p != 0) & (p != 1)
    p[bad] = 1 - t[bad]
    return {"f1": 100 * float(_f1(t, p, 1))}


def mean_class_f1(targets, preds, num_classes=3):
    """Unweighted mean of per-class F1 over classes 0..num_classes-1 (T5 mean_multiclass_f1, CB)."""
    t, p = np.asarray(targets), np.asarray(preds)
    return {f"mean_{num_classes}class_f1": 100 * float(np.mean([_f1(t, p, c) for c in range(num_classes)]))}


def matthews(targets, preds):
    """Matthews correlation x100 (CoLA), multiclass form over all labels seen (as sklearn; 0 if undefined)."""
    labels = sorted(set(targets) | set(preds))
    c = np.zeros((len(labels), len(labels)))
    for t, p in zip(targets, preds):
        c[labels.index(t), labels.index(p)] += 1
    tk, pk, s = c.sum(1), c.sum(0), c.sum()
    den = np.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return {"matthews_corrcoef": 100 * float((np.trace(c) * s - tk @ pk) / den) if den else 0.0}


def pearson_r(x, y):
    """Pearson's r of two 1-D sequences (NaN when one is constant); the figures' correlations use it too."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def pearson(targets, preds):
    return {"pearson_corrcoef": 100 * pearson_r(targets, preds)}


def _ranks(x):
    """Average ranks of ties, 1-based (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inv]


def spearman(targets, preds):
    # A "nan" prediction gives NaN, as scipy.stats.spearmanr does.
    if np.isnan(np.asarray(preds, np.float64)).any():
        return {"spearman_corrcoef": float("nan")}
    return {"spearman_corrcoef": 100 * pearson_r(_ranks(targets), _ranks(preds))}


def normalize_squad(text):
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~'))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(target, pred):
    common = sum((Counter(pred.split()) & Counter(target.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred.split()), common / len(target.split())
    return 2 * precision * recall / (precision + recall)


def squad(targets, preds):
    """SQuAD EM and token F1, each the max over the reference answers (T5 metrics.squad)."""
    targets = [[normalize_squad(a) for a in answers] for answers in targets]
    preds = [normalize_squad(p) for p in preds]
    em = [max(float(a == p) for a in answers) for answers, p in zip(targets, preds)]
    f1 = [max(_token_f1(a, p) for a in answers) for answers, p in zip(targets, preds)]
    return {"em": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}


def multirc(targets, preds):
    """MultiRC: F1 over all answers, and exact match of all answers of a question averaged over questions."""
    groups = defaultdict(list)
    for (t, group), p in zip(targets, preds):
        groups[group].append(t == p)
    em = [100 * float(all(right)) for right in groups.values()]
    return {**f1_with_invalid([t for t, _ in targets], preds), "exact_match": float(np.mean(em))}


def record(targets, preds):
    """ReCoRD: SQuAD EM/F1 over the answers, one prediction per (passage, query) (T5 deduplicate_metric)."""
    first = {}
    for (answers, group), p in zip(targets, preds):
        first.setdefault(group, (answers, p))
    return squad(*zip(*first.values()))


def _metric_package(module, pip_name):
    """Generation metrics use the packages T5 scores with, so numbers are comparable; they are optional."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this task is scored with {pip_name}: pip install {pip_name}   "
                          "(or: pip install -e '.[metrics]')") from e


def bleu(targets, preds):
    """Corpus BLEU as T5 metrics.bleu: sacrebleu, 'intl' tokenisation, exp smoothing, one reference each."""
    sacrebleu = _metric_package("sacrebleu", "sacrebleu")
    result = sacrebleu.corpus_bleu(preds, [targets], smooth_method="exp", smooth_value=0.0, force=False,
                                   lowercase=False, tokenize="intl", use_effective_order=False)
    return {"bleu": result.score}


def rouge(targets, preds, keys=("rouge1", "rouge2", "rougeLsum")):
    """ROUGE F-measures as T5 metrics.rouge: rouge-score, a newline after each " . " so rougeLsum
    sees sentences. T5 reports the median of a 1000-sample bootstrap of the mean (random); we report
    the mean itself."""
    scorer = _metric_package("rouge_score.rouge_scorer", "rouge-score").RougeScorer(list(keys))
    scores = [scorer.score(*(s.replace(" . ", " .\n") for s in (t, p))) for t, p in zip(targets, preds)]
    return {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in keys}


METRICS = {"accuracy": accuracy, "f1": f1_with_invalid, "mean3f1": mean_class_f1, "mcc": matthews,
           "pearson": pearson, "spearman": spearman, "squad": squad, "multirc": multirc, "record": record,
           "bleu": bleu, "rouge": rouge}


def score(task_name, examples, predictions):
    """T5's metrics (x100) of decoded predictions against loaded examples, plus 'score' = their mean
    (SPoT §2.1 footnote 5: a task with several metrics scores their average)."""
    task = get_task(task_name)
    if not task.metrics:
        raise NotImplementedError(f"{task.name} has no metric (an unsupervised source)")
    unlabeled = [_unlabeled(task, ex) for ex in examples]
    # ReCoRD/QA: T5's max() over no answers fails on any unlabelled example.
    if all(unlabeled) or (task.kind in ("record", "qa") and any(unlabeled)):
        raise ValueError(f"{task.name}: {sum(unlabeled)} of {len(examples)} examples have no label "
                         "(label -1 or no answers, as in a test split); "
                         "score a labelled split such as 'validation'")
    targets = [_target(task, ex) for ex in examples]
    preds = [postprocess(task.name, p, ex) for p, ex in zip(predictions, examples)]
    out = {k: v for m in task.metrics for k, v in METRICS[m](targets, preds).items()}
    out["score"] = float(np.mean(list(out.values())))
    return out


# ---------------------------------------------------------------------------------- the public files, fetched
# The small public files the tests, benchmarks and --tiny modes read (T5's vocabulary, small GLUE/SuperGLUE
# files, Google's released prompts and its T5X test checkpoint): `python3 data.py fetch [NAME ...]` puts them
# in data_root(), each checked against its sha256; full training data stays tfds's job. The sha256 are those
# of the copies tested here; the archives' those tfds 4.9.10 pins (url_checksums/glue.txt, super_glue.txt).
_PT = ("https://raw.githubusercontent.com/google-research/prompt-tuning/"
       "72285eea06100f954bcbb16a447ec6cddfc6716c/")
# Where a path comes from: the value of the first key that is the path or a folder of it, + the rest of the
# path. GLUE has no MRPC zip: its download script splits Microsoft's msr_paraphrase_train.txt by a list of
# dev ids (as tfds does); the license page comes from a public repository's copy of GLUE's MRPC folder.
HOMES = {
    "t5_spiece.model": "https://huggingface.co/google-t5/t5-small/resolve/"
                       "df1b051c49625cf57a3d0d8d3863ed4d13564fe4/spiece.model",
    "glue/MRPC/Microsoft_Shared_Source_License.htm": "https://raw.githubusercontent.com/Nstats/my_bert/"
        "733d79335044b1b7eabb5b47a0eae0cd621dadc0/data/MRPC/Microsoft_Shared_Source_License.htm",
    "glue/msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
                                     "msr_paraphrase_train.txt",
    "glue/mrpc_dev_ids.tsv": "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations."
        "appspot.com/o/data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
    "glue/": "https://dl.fbaipublicfiles.com/glue/data/",
    "superglue/": "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/",
    "prompt_tuning_release/": _PT + "prompt_tuning/pretrained_prompts/",
    "t5x_tiny_checkpoint/checkpoint_3/": _PT + "prompt_tuning/test_data/test_t5_1_1_tiny/checkpoint_3/",
    "t5x_tiny_checkpoint/": _PT + "prompt_tuning/test_data/",
}
_MRPC = ("glue/msr_paraphrase_train.txt", "glue/mrpc_dev_ids.tsv")


def _home(path):
    key = next(k for k in HOMES if path == k or (k.endswith("/") and path.startswith(k)))
    return HOMES[key] + path[len(key):]


def _source(path):
    """A file's source: its URL; "ARCHIVE:member" for a file of a GLUE/SuperGLUE zip (QNLI's is QNLIv2.zip);
    "mrpc:train" / "mrpc:dev" for GLUE's split of _MRPC."""
    top, folder, name = (path.split("/", 2) + ["", ""])[:3]
    if path in HOMES or top not in ("glue", "superglue"):
        return _home(path)
    if folder == "MRPC":
        return "mrpc:" + name.split(".")[0]
    return f"{top}/{'QNLIv2' if folder == 'QNLI' else folder}.zip:{folder}/{name}"


def _table(text):
    """(path, size, sha256) of each 'name size sha256' line; a line holding only a folder (or a name's
    beginning) is the prefix of the names below it."""
    rows, prefix = [], ""
    for line in text.strip().split("\n"):
        if len(fields := line.split()) == 1:
            prefix = fields[0]
        else:
            rows.append((prefix + fields[0], int(fields[1]), fields[2]))
    return rows


# Archives: downloaded to a temporary folder, unpacked, deleted. name: (url, size, sha256).
ARCHIVES = {name: (_home(name), size, sha) for name, size, sha in _table("""
glue/CoLA.zip                   376971 f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff
glue/SST-2.zip                 7439277 d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa
glue/STS-B.zip                  802872 e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85
glue/QNLIv2.zip               10627589 e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5
glue/RTE.zip                    697150 6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee
glue/msr_paraphrase_train.txt  1047044 60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89
glue/mrpc_dev_ids.tsv             6222 971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7
superglue/BoolQ.zip            4118001 853fbe7922f70c59629f06a39e8d9ca440c3d740e760fd3b87a5ddf3dcba2436
superglue/CB.zip                 75482 8d641383298d54554066ba1c93f56ae7410af75df621b90c63028806bbbbb535
superglue/COPA.zip               43986 405906cddac74bc1e1ce8220f1107d1025b66a25ef10149d91b10bb30651125f
superglue/MultiRC.zip          1116225 b3cd440856e72eb166b2edcd37b798455f1ebd51f2c3de64c0c2a4e1971d2737
superglue/RTE.zip               750920 6310aab3f000424c9d0318a1ff20692e07c7f4aa15e8f17a5972ea0a35c398b9
superglue/WiC.zip               396213 ee7e67f4ae9eafbf533780faa198e62167f3cda54256cdf261877be3c0e90900
superglue/WSC.zip                32751 2ed6dfa94556b4a128ff0441efe365b2e883124e7e6aa00fb8d3a6cb1fd520a9
""")}


def _with_zarray(rows):
    """T5X's tiny checkpoint: each layer kernel's chunk 0.0 comes with a .zarray header of 142 bytes, one of
    three texts (attention, wi, wo)."""
    for path, size, sha in rows:
        if ".layers_" in path:
            kind = "wi" if ".wi_" in path else "wo" if ".wo." in path else "attention"
            yield path.replace("/0.0", "/.zarray"), 142, _ZARRAY[kind]
        yield path, size, sha


_ZARRAY = {"attention": "23229cb6e577e7347912162e26305d31c10ef132a58fc60857195d9ab3362c64",
           "wi": "bb83d18b2bd8d1e50fb79e15ce1acdffc8982705e67bfad46d734d4e432ac324",
           "wo": "c63167da11e0a0cb3883c4a39ff921f189e67c9e570e3f8ee74632b4d60aaaf2"}
# The layout: (path, source, size, sha256); T5X's tiny checkpoint is the one of prompt-tuning's tests.
FILES = [(path, _source(path), size, sha) for path, size, sha in _with_zarray(_table("""
t5_spiece.model                 791656 d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86
glue/CoLA/dev.tsv                53717 8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd
glue/CoLA/train.tsv             428590 cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624
glue/MRPC/dev.tsv               103255 81c8a1a9e1dfe461dd2c1a4f98f43fe18bece44d2bf9e3d0b245b88e5aa5eaf7
glue/MRPC/train.tsv             919457 122becc469405bc16f9defcb8715d2a4b7ce600e9d9381e6dc42bfdd1494c51d
glue/QNLI/dev.tsv              1367333 763e95932dd3578251de71582e06829015f9c3815a518c751dc537219b159de4
glue/RTE/dev.tsv                 90343 80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb
glue/RTE/train.tsv              846226 41e3a9b063433392343fad9e962cf2f58b681c78d8f71592f4186f0837246c5c
glue/SST-2/dev.tsv               94931 54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0
glue/SST-2/train.tsv           3806081 48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1
glue/STS-B/LICENSE.txt            6641 3dfc3217395f8c5dd05c5f8995f25fe2f8fd258e6dd770b3de480749caee8c70
glue/STS-B/dev.tsv              276928 fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59
glue/STS-B/readme.txt             5994 e9488363d211c32ca5e912954f16eb9233cfed1b5b4b0475d0d812d35d7c8ef1
glue/STS-B/train.tsv            984099 41c4d978b6162abdcada7e49a982211954cca5459c228db478af333124b257a2
superglue/BoolQ/val.jsonl      2254565 0c86a5045886e5795fe9052003873f7d94b88ed3028a33007c51d99e44fd66d9
superglue/CB/train.jsonl         99499 32017480d3a10508646e3efd64502c639f13d4d15077f278d2fd0992c33a3126
superglue/CB/val.jsonl           24598 c6125587e9601560cb16ea223c33964c5a915568d2af68a81f651b6ef25395ec
superglue/COPA/train.jsonl       72323 e74ed25f36119fff954d90900ebbaae277e2cc4864be4b961e7a46c8f67d11a9
superglue/COPA/val.jsonl         18169 fa61467cc251010178ed72f8ca82a0fceefc4ca9a85f87ec3b6102955e1a1f1a
superglue/MultiRC/train.jsonl  3094341 bb73d0838618f8269190a2533fead3140607558975ea0df6511fa534e8d3535c
superglue/MultiRC/val.jsonl     550086 d2b480195b15574ac00d52c4479f630bc161a7ab2de77e970fd00652846953ee
superglue/RTE/train.jsonl       977550 fdfb03443abe3ec0424b7fc5d1a8863361719bc061338b7a63e56b94d615f201
superglue/RTE/val.jsonl         104895 ab990507bf5f35dc176cba7770a72bfa2c50a88ed72b8cc95cfbf9db95ab1af1
superglue/WSC/train.jsonl       140984 0ffaa3fd8d21e58a0805962565d1619aa4819bc3d034255777f606f801ae5a42
superglue/WSC/val.jsonl          31167 e5c685ea4bdc347354036a28176459f6feeb0b6870375ecfb3d6ddb1f0e28bef
superglue/WiC/train.jsonl      1211413 ce301970aaf361ade6c1d218fe15c50b185b14a4bcb618c5785a8484a46f9943
superglue/WiC/val.jsonl         146302 9f7207c88beba42cbc139de4c62ce05b23bffc189b3d561594b160e0c3920c0b
glue/MRPC/
Microsoft_Shared_Source_License.htm     9703 2d84356e4c1d0db09fa338ad7100ac56843c4ddd3d152c34130a6069f9f914c0
prompt_tuning_release/t5_1_1_lm100k_base/
mrpc.npy                        307328 b8ef84399006baf08f661f0c12eeddd2e3c56d809642988469afb86a9ecf2691
rte.npy                         307328 b31903cbbd7549cf64029bfd635af83b6cd39ed40e5a0252bcf2f70030a5ede5
sst2.npy                        307328 74a421fd286e967bf75eedd3e3b1e3076c884c9e02ea27561449cdcdf306cfb9
t5x_tiny_checkpoint/checkpoint_3/
checkpoint                     1045001 9f952b02f0f348b2d4ae686852c4f70d18c56714f86a54146d132ab33002e912
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_0.encoder_decoder_attention.
key.kernel/0.0                      87 de202966b435286b95211b80b4eb2f8e2a339dcb667565cbe5a2587040a4ae2f
out.kernel/0.0                      87 80eb3ec1e219ba3e201364884497feca6c526c7aca7195a17276981e98dfc4c4
query.kernel/0.0                    87 d433cbc5ba2d7ae4abc4cd233c64e8794121d742af02452cef45919fc0d70ea0
value.kernel/0.0                    87 411d260dc822c4ff8abb5813c0ede2bac7eeb15f94c3715de68fcbd3045247eb
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_0.mlp.
wi_0.kernel/0.0                    151 8c3bca3d41dc6fd1ab5a953b4bf4042ed170ae602ac6c177ac6b8f902f5efd46
wi_1.kernel/0.0                    151 d81a39f9e336ef01083d5d53222ecf6b9ee56570dc1f2391624576c76386754d
wo.kernel/0.0                      151 baaeb7d5418581ad01d38e26b1f23f476330bf1332277e854a94dd910e96826e
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_0.self_attention.
key.kernel/0.0                      87 89afe87d59279f2205d8b2bfa8ac344c6a68149f84ea1a391390165b29a79124
out.kernel/0.0                      87 7522016d965c9cef1d51498afebe8a2308d2d0663f7dfa1f334a58a6d949e572
query.kernel/0.0                    87 c6af3b91fd98ab99ae6e9d69e2ffe7074e253e61af3c56f1483cd18b6beb65aa
value.kernel/0.0                    87 209134bbc866107719192a87bc5c11adf5e37b3e2c75a87451c8d109d645499f
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_1.encoder_decoder_attention.
key.kernel/0.0                      87 973a9c388db70210cb16dd3e62f0ab908d93fe48af0d55f53a4082f1f524f56b
out.kernel/0.0                      87 8b4d61766b8e1afa56aca8287f52e68251df3e1c10e428530f8a2ead7aacfc7a
query.kernel/0.0                    87 8f2db4e5f68280f988466b104a19cc9d20f9e93a216a19c8cc1287a1914ea75e
value.kernel/0.0                    87 fc6d9a03d53e3bf46d51322475c5a36f999b14306eb877c0b92dbcb32662fae9
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_1.mlp.
wi_0.kernel/0.0                    151 f2e414de013d648f27c9338ec4d422e2240fe31e5fd01ca7a080686b8993a69d
wi_1.kernel/0.0                    151 de0b8c8902d4f15985dc510bed858c79a88569545667514eee26d49d4d06953a
wo.kernel/0.0                      151 8e930415a7e583ca860b9465095b2ac1e64f5b0d5f4891dcd78dbc692ce8f700
t5x_tiny_checkpoint/checkpoint_3/target.decoder.layers_1.self_attention.
key.kernel/0.0                      87 a6c67261a9421896cfca01f9f40e5db7a0293dd3f64329155ec429104379b537
out.kernel/0.0                      87 97c8e04f4e40c17286fe5882a37cc8d320da40b89f2c95785ac24f802d23fb6e
query.kernel/0.0                    87 71fbcc12f6354ea8941f44fd3563934454a404552f26d71c451feedb7ff9955b
value.kernel/0.0                    87 50b48fc3bb1e5f3bb94ace9abd349cf30e62104306510b784df6d1e22307c855
t5x_tiny_checkpoint/checkpoint_3/target.decoder.logits_dense.
kernel/.zarray                     149 47b904551b464d91c474992f62d9f522102650b2d142cad7b04f1c4322406206
kernel/0.0                       61044 5b88fefd39456e6316a5fc9a0122e8d40189cd8e0bf9bd805efb0f0a74dd5c52
kernel/0.1                       61041 ab8c14d279cab7fd39fb445207d39bc6174c0016797a99e7506d105c6cc6abdd
kernel/0.2                       61027 d4642ccf09a30221489fb42ecb5c56674491260ed457516b43e95985d897e3ce
kernel/0.3                       61024 877fb7d16e34da914be1f9c9d0ff9d68eb735216f503f5f78cc7d26c2149d94b
kernel/0.4                       61019 5e6c14249ea5daa30e5a205f19f64d39f3b9823fdd6d79b21643d136868ed11a
kernel/0.5                       61019 0beb914f27d28a4f35c86c0444e7b40816fd362e2d856f3c8dd66ddbf191b746
kernel/0.6                       60998 35814083ce5a8d8ebc4f53f5681774ddb08c544610f1efef1d726422076ea5c3
kernel/0.7                       51671 77836804630080482254c789d1a5724e704bed54c47bd3edaf421d6b3917d377
t5x_tiny_checkpoint/checkpoint_3/target.encoder.layers_0.attention.
key.kernel/0.0                      87 db52dd06966af9b264617bb82f14627b9fe922463b73eb208460c2e5a528dc74
out.kernel/0.0                      87 17b1ecca8ba94b5dd86c4baadac30223bca2d5db436aade95b1220a9875ace46
query.kernel/0.0                    87 a234e79375d0689b83a0023fa9d361e6f5898c776df866dbb09d591c5c14dda1
value.kernel/0.0                    87 9eabdb944e9c7a67e33f2aa8b6f600c00cfa3541a4570b5ca0828912a73e64d4
t5x_tiny_checkpoint/checkpoint_3/target.encoder.layers_0.mlp.
wi_0.kernel/0.0                    151 bda998ae42fd75888f13916fc53242bc84aec2f0d9d7c460dae767ba384ea249
wi_1.kernel/0.0                    151 324c8c54c1f66634b14643cb2dfd8e000a37eaf4e2bb61545608f2d322aa2f35
wo.kernel/0.0                      151 8f340bca3e0b460f9d172771529f705ad603f889e354f8db97d97fd390d73b7c
t5x_tiny_checkpoint/checkpoint_3/target.encoder.layers_1.attention.
key.kernel/0.0                      87 6b944ac72431b49abddc7160f0bab30980da890e1a84d7be7a6d3f76b8c22740
out.kernel/0.0                      87 1f148daf412eed1ffcc8c24117ecf177da9224c0bed2af9ef000ed6e5a092f52
query.kernel/0.0                    87 28d1d442fe66596a8606e98cfcc45671756a4cd42478bdaec561d9c1d28a04b2
value.kernel/0.0                    87 f0de4634a0fd913e1c4435633c80d5042ddb533ec6203925ab7198f8c2d6ee11
t5x_tiny_checkpoint/checkpoint_3/target.encoder.layers_1.mlp.
wi_0.kernel/0.0                    151 1ae20299a80a8713a852089ad0cd0823327ade2bf1dceeee6a02e3dd610945fb
wi_1.kernel/0.0                    151 69c473d0b2dd5d481d6d831eee845a73296a73cbddc4f23c63829a7ccb7ac171
wo.kernel/0.0                      151 b3b7a35ba1cdaa215f57377cc39854126a758182924d8ca929f0df6b30d0463a
t5x_tiny_checkpoint/checkpoint_3/target.token_embedder.
embedding/.zarray                  149 546bba34d8e9907ffd0a2fc1dbed66ab9ae36c937f6d48703a03a203fb870ec8
embedding/0.0                    60851 6ebb738bbb759d4a1f50ba4fb376eac90732f65a692c3b80dea190b2e57c0696
embedding/1.0                    60849 dfd9052e435d2d73141dfeeea1711ef6c68ad8215fc8530ecf13b75da2b4ecc1
embedding/2.0                    60858 6d9017684fdac8c2087092cbe9e1f9176471a2c8d0a6b677d2c81921e6e4c904
embedding/3.0                    60855 a29eab6672ca8b5c565f5aa8906a947d0aa04f05356be01508793d2c82bc3ee4
embedding/4.0                    60858 2828a42cf502dc70693ef24223d37dac2dcf912652fb4c456d30cb46d3df2a71
embedding/5.0                    60854 0372dcc1dd029269049d5682aa23b3a36cb06b44809c8d7231189a5d4b63984a
embedding/6.0                    60842 f7f7030f2611c8b6465a7392d9875fea8b74f83df1d0fd46d7796a4c8f70fa78
embedding/7.0                    51485 999a5af1286fd446074444b66f27694bb5c4cc343b98e088dd01973e57ef7300
t5x_tiny_checkpoint/
prompt_5x256.npy                 10368 baf8b299c6b2007ca724ae473c66749ad797a54d2ed5d5409186bd2e63b67cd4
"""))]
FETCH_HINT = "python3 data.py fetch"
PROGRESS_BYTES = 2 ** 20          # files from this size on show a progress bar


class FetchError(OSError):
    """A file could not be fetched, or its bytes are not the table's: the message is one line."""


def data_root():
    """The cache of fetched files: $SPOT_DATA, else $XDG_CACHE_HOME (default ~/.cache)/spot-jax/data."""
    if os.environ.get("SPOT_DATA"):
        return Path(os.environ["SPOT_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "spot-jax" / "data"


def _selected(names):
    """The FILES rows under the given names (paths or folders of the layout); all rows for no names."""
    under = {n: [r for r in FILES if (r[0] + "/").startswith(n.strip("/") + "/")] for n in names or ()}
    if unknown := [n.strip("/") for n, rows in under.items() if not rows]:
        tops = sorted({r[0].split("/")[0] for r in FILES})
        raise FetchError(f"nothing to fetch under {', '.join(unknown)}; names are files or folders of "
                         f"{', '.join(tops)}")
    return [r for r in FILES if not names or any(r in rows for rows in under.values())]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def missing(names=None, root=None):
    """The FILES rows under `names` that the cache lacks (absent, or not the table's bytes)."""
    root = Path(root or data_root())
    return [r for r in _selected(names) if not ((root / r[0]).is_file() and
                                                 (root / r[0]).stat().st_size == r[2] and
                                                 _sha256(root / r[0]) == r[3])]


def _progress(label, done, total, width=30):
    """A bar on stderr, redrawn when it grows: `glue/SST-2/train.tsv [#####     ] 1.2/3.6 MiB`."""
    bar = "#" * (width * done // total)
    print(f"\r{label} [{bar:<{width}}] {done / 2 ** 20:.1f}/{total / 2 ** 20:.1f} MiB",
          end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _commit(dest, chunks, sha, what):
    """Write chunks to a temporary file beside dest, then rename it to dest only if their sha256 is `sha`.
    Anything else (a wrong checksum, a broken connection, Ctrl-C) leaves no file at dest and no temporary."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
        if h.hexdigest() != sha:
            raise FetchError(f"{what}: sha256 {h.hexdigest()}, expected {sha}; nothing was saved")
        os.replace(part, dest)
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return dest


def _download(url, dest, size, sha, label):
    """url -> dest, checked (see _commit); a bar on stderr for large files."""
    def chunks():
        done = total = 0
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                total = int(r.headers.get("Content-Length") or size)
                while chunk := r.read(1 << 16):
                    done += len(chunk)
                    if total >= PROGRESS_BYTES and (30 * done // total > 30 * (done - len(chunk)) // total):
                        _progress(label, done, total)
                    yield chunk
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise FetchError(f"could not reach {url} ({reason}) for {label}; fetch from a copy with "
                             "SPOT_DATA_MIRROR=URL") from None
        if done < total:
            raise FetchError(f"{label}: the connection to {url} closed after {done} of {total} bytes")
    return _commit(dest, chunks(), sha, f"{label} from {url}")


def mrpc_split(train_txt, dev_ids_tsv, split):
    """GLUE's MRPC train.tsv / dev.tsv (download_glue_data.py): the rows of msr_paraphrase_train.txt whose
    (#1 ID, #2 ID) are (dev) or are not (train) GLUE's dev ids, under its header (byte-order mark kept)."""
    dev = {tuple(line.strip().split("\t")) for line in dev_ids_tsv.split("\n") if line.strip()}
    header, *rows = train_txt.replace("\r\n", "\n").split("\n")
    out = [header]
    for row in filter(None, rows):
        label, id1, id2, s1, s2 = row.strip().split("\t")
        if ((id1, id2) in dev) == (split == "dev"):
            out.append("\t".join((label, id1, id2, s1, s2)))
    return "".join(line + "\n" for line in out).encode("utf-8")


def fetch(names=None, root=None, mirror=None):
    """Fetch the FILES rows under `names` (all by default) that the cache lacks; returns the cache folder.
    mirror (default $SPOT_DATA_MIRROR): fetch each file as <mirror>/<its path> instead of its source."""
    root = Path(root or data_root())
    mirror = os.environ.get("SPOT_DATA_MIRROR") if mirror is None else mirror
    todo = missing(names, root)
    if not todo:
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        @functools.cache
        def archive(name):  # downloaded once, for all the files it holds
            url, size, sha = ARCHIVES[name]
            return _download(url, Path(tmp) / name.replace("/", "_"), size, sha, name)

        for path, source, size, sha in todo:
            if mirror:
                _download(f"{mirror.rstrip('/')}/{urllib.parse.quote(path)}", root / path, size, sha, path)
            elif "://" in source:
                _download(source, root / path, size, sha, path)
            elif source.startswith("mrpc:"):
                train_txt, dev_ids = (archive(n).read_text(encoding="utf-8") for n in _MRPC)
                blob = mrpc_split(train_txt, dev_ids, source[5:])
                _commit(root / path, [blob], sha, f"{path} (GLUE's MRPC split of {ARCHIVES[_MRPC[0]][0]})")
            else:
                name, member = source.split(":", 1)
                with zipfile.ZipFile(archive(name)) as z:
                    blob = z.read(member)
                _commit(root / path, [blob], sha, f"{path} ({member} of {ARCHIVES[name][0]})")
    print(f"fetched {len(todo)} file(s) into {root}", file=sys.stderr)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fetch the public files the tests, benchmarks and --tiny "
                                     "modes read into the cache ($SPOT_DATA); prints its path.")
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("names", nargs="*", help="files or folders of the layout (default: all)")
    args = parser.parse_args()
    try:
        print(fetch(args.names))
    except FetchError as e:
        sys.exit(f"fetch: {e}")
