"""data.py: record counts of the shared files, T5 text formats (known answers written from T5's
preprocessors), tokenisation, resumable batches, mixing rates, metrics (hand-computed and scipy),
the tfds path (mock_data)."""
import importlib.util
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import data

# ----------------------------------------------------------------------------- PROVENANCE.md record counts
COUNTS = [("cola", "validation", 1043), ("cola", "train", 8551), ("sst2", "validation", 872),
          ("sst2", "train", 67349), ("mrpc", "validation", 408), ("mrpc", "train", 3668),
          ("stsb", "validation", 1500), ("stsb", "train", 5749), ("qnli", "validation", 5463),
          ("rte", "validation", 277), ("rte", "train", 2490), ("boolq", "validation", 3270),
          ("cb", "train", 250), ("cb", "validation", 56), ("copa", "train", 400), ("copa", "validation", 100),
          ("superglue_rte", "train", 2490), ("superglue_rte", "validation", 277), ("wic", "train", 5428),
          ("wic", "validation", 638), ("wsc", "train", 554), ("wsc", "validation", 104)]


@pytest.mark.parametrize("task,split,n", COUNTS)
def test_shared_files_parse_to_provenance_counts(shared_data, task, split, n):
    examples = data.load_examples(task, split, data_dir=shared_data)
    assert len(examples) == n
    assert [e["idx"] for e in examples] == list(range(n))          # tfds: idx = row / record number
    if data.get_task(task).label_names:
        assert {e["label"] for e in examples} <= set(range(len(data.get_task(task).label_names)))


@pytest.mark.parametrize("split,paragraphs,questions,answers", [("train", 456, 5131, 27243),
                                                                ("validation", 83, 953, 4848)])
def test_multirc_flattened_like_tfds(shared_data, split, paragraphs, questions, answers):
    ex = data.load_examples("multirc", split, data_dir=shared_data)
    assert len(ex) == answers
    assert len({e["idx"]["paragraph"] for e in ex}) == paragraphs
    assert len({(e["idx"]["paragraph"], e["idx"]["question"]) for e in ex}) == questions
    assert set(ex[0]) == {"paragraph", "question", "answer", "label", "idx"}


def test_label_balance_matches_provenance(shared_data):
    cola = data.load_examples("cola", "validation", data_dir=shared_data)
    assert sum(e["label"] for e in cola) == 721                  # 721 acceptable / 322 unacceptable
    mrpc = data.load_examples("mrpc", "validation", data_dir=shared_data)
    assert sum(e["label"] for e in mrpc) == 279
    cb = data.load_examples("cb", "validation", data_dir=shared_data)
    # entailment / contradiction / neutral
    assert [sum(e["label"] == c for e in cb) for c in range(3)] == [23, 28, 5]


# ----------------------------------------------------------------------------- known {inputs, targets} pairs
def first(shared_data, task, split="validation"):
    return data.to_text(task, data.load_examples(task, split, data_dir=shared_data)[0])


def test_glue_formats_on_first_records(shared_data):
    assert first(shared_data, "cola") == {
        "inputs": "cola sentence: The sailors rode the breeze clear of the rocks.",
        "targets": "acceptable"}
    assert first(shared_data, "sst2") == {
        "inputs": "sst2 sentence: it 's a charming and often affecting journey . ",
        "targets": "positive"}
    assert first(shared_data, "mrpc") == {
        "inputs": "mrpc sentence1: He said the foodservice pie business doesn't fit the company's long-term "
                  "growth strategy. "
                  "sentence2: \"The foodservice pie business does not fit our long-term growth strategy.",
        "targets": "equivalent"}
    assert first(shared_data, "stsb") == {
        "inputs": "stsb sentence1: A man with a hard hat is dancing. "
                  "sentence2: A man wearing a hard hat is dancing.",
        "targets": "5.0"}
    assert first(shared_data, "qnli") == {
        "inputs": "qnli question: What came into force after the new constitution was herald? "
                  "sentence: As of that day, the new constitution heralding the Second Republic "
                  "came into force.",
        "targets": "entailment"}
    rte = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
           "according to the Christopher Reeve Foundation.", "Christopher Reeve had an accident.")
    assert first(shared_data, "rte") == {"inputs": f"rte sentence1: {rte[0]} sentence2: {rte[1]}",
                                         "targets": "not_entailment"}
    # SuperGLUE RTE: same example, T5 sorts the tfds feature names -> hypothesis before premise.
    assert first(shared_data, "superglue_rte") == {"inputs": f"rte hypothesis: {rte[1]} premise: {rte[0]}",
                                                   "targets": "not_entailment"}


def test_mnli_and_test_label():
    ex = {"premise": "A man sleeps.", "hypothesis": "A man runs.", "label": 2, "idx": 0}
    assert data.to_text("mnli", ex) == {"inputs": "mnli hypothesis: A man runs. premise: A man sleeps.",
                                        "targets": "contradiction"}
    assert data.to_text("mnli", {**ex, "label": -1})["targets"] == "<unk>"     # unlabeled test example


def test_stsb_rounds_to_point_two_half_to_even():
    def target(x):
        return data.to_text("stsb", {"sentence1": "a", "sentence2": "b", "label": x, "idx": 0})["targets"]
    assert [target(x) for x in (3.8, 1.79, 2.5, 0.1, 5.0)] == ["3.8", "1.8", "2.4", "0.0", "5.0"]


def test_superglue_formats_on_first_records(shared_data):
    assert first(shared_data, "cb") == {
        "inputs": "cb hypothesis: Valence was helping "
                  "premise: Valence the void-brain, Valence the virtuous valet. Why couldn't the figger "
                  "choose his own portion of titanic anatomy to shaft? Did he think he was helping?",
        "targets": "contradiction"}
    assert first(shared_data, "copa") == {
        "inputs": "copa choice1: The toilet filled with water. choice2: Water flowed from the spout. "
                  "premise: The man turned on the faucet. question: effect",
        "targets": "choice2"}
    assert first(shared_data, "wic") == {
        "inputs": "wic sentence1: An emerging professional class. "
                  "sentence2: Apologizing for losing your temper, even though you were badly provoked, "
                  "showed real class. word: class",
        "targets": "False"}
    boolq = first(shared_data, "boolq")
    assert boolq["inputs"].startswith("boolq passage: Ethanol fuel -- All biomass goes through")
    assert boolq["inputs"].endswith(" question: does ethanol take more energy make that produces")
    assert boolq["targets"] == "False"
    multirc = first(shared_data, "multirc")
    assert multirc["inputs"].startswith(
        "multirc question: Would the mass of a baseball affect how much force you have to use to pick it up? "
        "answer: No paragraph: What causes a change in motion? The application of a force.")
    assert multirc["targets"] == "False"
    assert first(shared_data, "wsc") == {
        "inputs": "wsc: Bernard , who had not told the government official that he was less than 21 when he "
                  "filed for a homestead claim, did not consider that he had done anything dishonest. "
                  "Still, anyone who knew that he was 19 years old could take his claim away from *him* .",
        "targets": "anyone"}


def test_multirc_drops_html_markup():
    ex = {"paragraph": "<b>Sent 1: </b>A cat.<br><b>Sent 2: </b>It sat.<br>", "question": "What sat?",
          "answer": "A cat", "label": 1, "idx": {"paragraph": 0, "question": 0, "answer": 0}}
    assert data.to_text("multirc", ex) == {
        "inputs": "multirc question: What sat? answer: A cat paragraph: Sent 1: A cat. Sent 2: It sat. ",
        "targets": "True"}


def test_wsc_simple_and_wsc_fixed_spans(shared_data):
    # T5's wsc_simple docstring example
    ex = {"text": "Mitchell asked Tom if he could lend some money.", "span1_index": 2, "span2_index": 4,
          "span1_text": "Tom", "span2_text": "he", "label": 1, "idx": 0}
    assert data.to_text("wsc", ex) == {"inputs": "wsc: Mitchell asked Tom if *he* could lend some money.",
                                       "targets": "Tom"}
    val = {e["idx"]: e for e in data.load_examples("wsc", "validation", data_dir=shared_data)}
    assert val[5]["span1_text"] == "the table"  # raw file: "The table"; wsc.fixed matches the text's case
    train = data.load_examples("wsc", "train", data_dir=shared_data)
    assert len(data.text_pairs("wsc", train, train=True)) == 259   # only true referents (T5 weight: 259)


def test_wsc_special_cases_need_the_whole_text():
    """T5 rewrites two texts whose span2_index is off by comparing the whole text; WSC train has three other
    texts with the same first sentences ("Served him right") that keep the general rule."""
    pony = ('The boy continued to whip the pony , and eventually the pony threw him over. John laughed out '
            'quite loud. "{}," he said.')
    served = {"text": pony.format("Served him right"), "span1_index": 2, "span1_text": "boy",
              "span2_index": 21, "span2_text": "him", "label": 1, "idx": 147}
    assert data.to_text("wsc", served)["inputs"] == "wsc: " + pony.format("Served *him* right")
    good = {**served, "text": pony.format("Good for him") + " ", "span2_index": 22}   # words[22] = 'him,"'
    assert data.to_text("wsc", good)["inputs"] == "wsc: " + pony.format("Good for *him* ")


WSC_TOM = {"text": "Mitchell asked Tom if he could lend some money.", "span1_index": 2, "span2_index": 4,
           "span1_text": "Tom", "span2_text": "he", "label": 1, "idx": 0}


@pytest.mark.parametrize("prediction,referent,expected", [
    ("Tom", "Tom", 1), (" The TOM ", "Tom", 1),            # case, surrounding space and determiners ignored
    ("fuzzy bunny", "the bunny", 1), ("bunny", "his fuzzy bunny", 1),   # either word set inside the other
    ("Tom's hat", "Tom", 0), ("Tom", "Tom's hat", 0),      # an apostrophe on one side only: not the referent
    ("Mitchell", "Tom", 0), ("Tom Mitchell", "Tom money", 0),
    ("", "Tom", -1), ("   ", "Tom", -1), ("the", "Tom", -1), ("His", "Tom", -1),
    ("their those", "Tom", -1)])                           # nothing left: -1, never 0 = "label False"
def test_wsc_postprocess_is_t5_wsc_simple(prediction, referent, expected):
    """Known answers of T5 postprocessors.wsc_simple: lower-case, drop its 21 determiners, -1 when nothing is
    left, 0 when only one side has an apostrophe, else 1 iff one word set contains the other. The referent is
    the example's target text (T5: targets_pretokenized = span1_text)."""
    assert data.postprocess("wsc", prediction, {**WSC_TOM, "span1_text": referent}) == expected


def test_wsc_empty_predictions_score_zero(shared_data):
    """An empty answer (or one of determiners only) matches no label: before T5's -1 it scored 0 = False,
    which is the label of 66 of the 104 validation examples (63.5%)."""
    val = data.load_examples("wsc", "validation", data_dir=shared_data)
    assert sum(e["label"] == 0 for e in val) == 66
    assert data.score("wsc", val, [""] * len(val))["accuracy"] == 0.0
    assert data.score("wsc", val, ["the"] * len(val))["accuracy"] == 0.0
    gold = [data.to_text("wsc", e)["targets"] for e in val]
    true = sum(e["label"] for e in val)                      # the target names the true referent iff label 1
    assert data.score("wsc", val, gold)["accuracy"] == pytest.approx(100 * true / len(val))


def test_record_format_and_training_expansion():
    # T5's record docstring example
    ex = {"passage": "This is the passage.", "query": "A @placeholder is a bird.",
          "entities": ["penguin", "potato", "pigeon"], "answers": ["penguin", "pigeon"],
          "idx": {"passage": 0, "query": 0}}
    inputs = ("record query: A @placeholder is a bird. entities: penguin, potato, pigeon "
              "passage: This is the passage.")
    assert data.to_text("record", ex) == {"inputs": inputs, "targets": "penguin"}
    assert [p["targets"] for p in data.text_pairs("record", [ex], train=True)] == ["penguin", "pigeon"]
    hl = data.to_text("record", {**ex, "passage": "A cat sat.\n@highlight\nDogs bark\n@highlight\nEnd"})
    assert hl["inputs"].endswith("passage: A cat sat. Dogs bark. End")


def test_other_families():
    qa = {"question": "Who won?", "context": "Denver won (24-10).", "answers": ["Denver"]}
    assert data.to_text("drop", qa) == {"inputs": "question: Who won ? context: Denver won ( 24 - 10 ) . ",
                                        "targets": "Denver"}
    assert data.to_text("docnli", {"premise": "A  dog\nbarks.", "hypothesis": "A dog.", "label": 1}) == {
        "inputs": "doc_nli hypothesis: A dog. premise: A dog barks.", "targets": "entailment"}
    winogrande = {"sentence": "The _ sat.", "option1": "cat", "option2": "dog", "label": 1}
    assert data.to_text("winogrande", winogrande) == {
        "inputs": "winogrande sentence: The _ sat. option1: cat option2: dog", "targets": "2"}
    assert data.to_text("wmt_ende", {"en": "That is good.", "de": "Das ist gut."}) == {
        "inputs": "translate English to German: That is good.", "targets": "Das ist gut."}
    assert data.to_text("cnn_dailymail", {"article": "A b.", "highlights": "B."}) == {
        "inputs": "cnn_dailymail summarize: A b.", "targets": "B."}
    text = "one two three four five six seven"
    lm = data.to_text("c4", {"text": text})
    assert lm["inputs"] and lm["targets"] and f"{lm['inputs']} {lm['targets']}" == text
    assert data.to_text("c4", {"text": text}) == lm  # the cut depends only on the text


def test_qa_pads_ascii_punctuation_only():
    """T5 _pad_punctuation pads RE2 [[:punct:]] (its test: '"Introducción (la vídeo)".'), '_' included;
    letters outside ASCII stay whole, so an accented answer still matches its reference."""
    qa = {"question": '"Introducción (la vídeo)".', "context": "snake_case—x", "answers": ["Beyoncé!"]}
    assert data.to_text("squad", qa) == {
        "inputs": 'squad question: " Introducción ( la vídeo ) " . context: snake _ case—x',
        "targets": "Beyoncé ! "}
    assert data.score("squad", [qa], ["beyoncé"])["em"] == 100.0


# Official SPoT (google-research/prompt-tuning, prompt_tuning/spot/data/mrqa.py): task spot_mrqa_<name> reads
# tfds mrqa/<name> and writes prompt_tuning/data/preprocessors.py `mrqa` with task_name=<name>.
MRQA = [("mrqa_squad", "squad"), ("newsqa", "news_qa"), ("triviaqa", "trivia_qa"), ("searchqa", "search_qa"),
        ("hotpotqa", "hotpot_qa"), ("naturalquestions", "natural_questions")]
QA_EXAMPLE = {"qid": "q0", "question": "Who won?", "context": "Denver  won\n(24-10).",
              "answers": ["Denver (CO)", "CO"]}


@pytest.mark.parametrize("task,name", MRQA)
def test_mrqa_tasks_are_the_official_spot_tasks(task, name):
    """"<name> question: <q> context: <c>" -> the first answer; question, context and answer punctuation
    padded (T5 _pad_punctuation), whitespace collapsed (T5 _string_join)."""
    assert data.get_task(task).tfds_name == f"mrqa/{name}"
    inputs = f"{name} question: Who won ? context: Denver won ( 24 - 10 ) . "
    assert data.to_text(task, QA_EXAMPLE) == {"inputs": inputs, "targets": "Denver ( CO ) "}
    assert data.score(task, [QA_EXAMPLE], ["co"])["em"] == 100.0          # any reference answer counts


def test_squad_alone_is_squad_v11_in_the_official_format():
    """SPoT Table 2's SQuAD source has 88K examples: squad/v1.1 (87,599 train), not mrqa/squad (86,588). Its
    input is the official SPoT squad task's, so a SQuAD prompt sees what the MRQA mixture's SQuAD sees."""
    raw = {"id": "5733be", "title": "Denver", "question": "Who won?", "context": "Denver  won\n(24-10).",
           "answers": {"text": ["Denver (CO)", "CO"], "answer_start": [0, 8]}}      # tfds squad/v1.1 layout
    ex, = data.get_task("squad").adapt(raw)
    assert data.get_task("squad").tfds_name == "squad/v1.1"
    assert data.to_text("squad", ex) == data.to_text("mrqa_squad", QA_EXAMPLE)
    assert data.MIXTURES["MRQA"] == tuple(t for t, _ in MRQA)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_anli_rounds_are_the_official_spot_tasks(r):
    """Official SPoT nli.py: one task per round, spot_anli_r<r> on tfds anli/r<r>, written by its
    preprocess_text_classification: "anli_r<r> hypothesis: <h> context: <c>" -> the label name."""
    ex = {"uid": "u0", "context": "A man\n sleeps.", "hypothesis": "A man is awake.", "label": 2}
    assert data.get_task(f"anli_r{r}").tfds_name == f"anli/r{r}"
    assert data.to_text(f"anli_r{r}", ex) == {
        "inputs": f"anli_r{r} hypothesis: A man is awake. context: A man sleeps.", "targets": "contradiction"}


def test_nli_mixture_has_the_three_anli_rounds():
    """SPoT App. B's NLI mixture with ANLI as the official code's three tasks. Every round is below K = 2^19,
    so examples-proportional mixing gives the three the rate the pooled dataset had."""
    assert data.MIXTURES["NLI"] == ("anli_r1", "anli_r2", "anli_r3", "cb", "docnli", "mnli", "qnli", "rte",
                                    "snli")
    rounds = {"anli_r1": 16_946, "anli_r2": 45_460, "anli_r3": 100_459}                # tfds anli train sizes
    split = data.mixture_rates({**rounds, "mnli": 392_702})
    pooled = data.mixture_rates({"anli": sum(rounds.values()), "mnli": 392_702})
    assert sum(split[t] for t in rounds) == pytest.approx(pooled["anli"], rel=1e-15)


@pytest.mark.parametrize("task,start", [*[(t, f"{n} question: ") for t, n in MRQA],
                                        ("squad", "squad question: "),
                                        *[(f"anli_r{r}", f"anli_r{r} hypothesis: ") for r in (1, 2, 3)]])
def test_official_tasks_load_through_tfds(task, start):
    """The tfds builders exist and their records format (mock_data: random records of the real features)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2):
        examples = data.load_examples(task, "validation")
    assert len(examples) == 2 and data.to_text(task, examples[0])["inputs"].startswith(start)


# ----------------------------------------------------------------------------- registry, mixtures, errors
# SPoT Table 2: 16 sources, then 10 targets
TABLE2 = ["C4", "DocNLI", "Yelp-2", "MNLI", "QQP", "QNLI", "ReCoRD", "CxC", "SQuAD", "DROP", "SST-2",
          "WinoGrande", "HellaSWAG", "MultiRC", "CosmosQA", "RACE",
          "BoolQ", "CoLA", "STS-B", "WiC", "CR", "MRPC", "RTE", "WSC", "COPA", "CB"]


def test_registry_covers_table2_and_mixtures():
    assert [data.get_task(n).name for n in TABLE2] == [
        "c4", "docnli", "yelp2", "mnli", "qqp", "qnli", "record", "cxc", "squad", "drop", "sst2",
        "winogrande", "hellaswag", "multirc", "cosmosqa", "race",
        "boolq", "cola", "stsb", "wic", "cr", "mrpc", "rte", "wsc", "copa", "cb"]
    for members in data.MIXTURES.values():
        assert all(data.get_task(t).name == t for t in members)
    assert len(data.MIXTURES["All"]) == 57       # SPoT App. B: 55 labeled source datasets, ANLI as 3 rounds
    assert [len(data.MIXTURES[m]) for m in ("GLUE", "SuperGLUE", "NLI", "Paraphrase", "Sentiment", "MRQA",
                                            "RAINBOW", "Translation", "Summarization", "GEM")] == \
        [8, 8, 9, 4, 5, 6, 6, 3, 9, 8]


def test_unknown_task_is_one_plain_line_listing_tasks_and_mixtures():
    with pytest.raises(KeyError) as e:
        data.get_task("not_a_task")
    message = str(e.value)           # a KeyError's str() is its repr, in quotes; this one is the line itself
    assert message.startswith("unknown task 'not_a_task' (--task); tasks: ") and "\n" not in message
    assert "cola" in message and "wsc" in message and "mixtures: GLUE, SuperGLUE" in message
    assert data.task_names("glue") == ("GLUE", data.MIXTURES["GLUE"])
    assert data.task_names("STS-B") == (None, ("stsb",))


def test_model_vocab_reads_the_checkpoint_folder_and_for_tiny_the_fetch_cache(shared_data, tmp_path,
                                                                               monkeypatch):
    """--model DIR reads DIR/spiece.model and --model tiny the cache's t5_spiece.model: neither asks the hub
    (which offline retried for ~27 s)."""
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.delenv("SPOT_VOCAB", raising=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "spiece.model").write_bytes((shared_data / "t5_spiece.model").read_bytes())
    assert data.model_vocab(tmp_path / "ckpt").path == tmp_path / "ckpt" / "spiece.model"
    monkeypatch.setenv("SPOT_DATA", str(shared_data))
    assert data.model_vocab("tiny").path == shared_data / "t5_spiece.model"
    other = tmp_path / "other.model"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="other.model is not a SentencePiece model"):   # --vocab wins
        data.model_vocab(tmp_path / "ckpt", other)


def test_missing_file_empty_split_and_unknown_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv.*gluebenchmark"):
        data.load_examples("rte", "validation", data_dir=tmp_path)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(ValueError, match="empty"):
        data.load_examples("rte", "validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="known: .*validation"):
        data.load_examples("rte", "dev", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds has no cr.*SentEval"):
        data.load_examples("cr", "train")
    with pytest.raises(FileNotFoundError, match="no reader for local files"):
        data.load_examples("squad", "train", data_dir=tmp_path)


def test_other_readers(tmp_path):
    docnli = [{"premise": "P.", "hypothesis": "H.", "label": "entailment"}]
    (tmp_path / "train.json").write_text(json.dumps(docnli))
    assert data.load_examples("docnli", "train", data_dir=tmp_path) == [
        {"premise": "P.", "hypothesis": "H.", "label": 1}]
    (tmp_path / "CR").mkdir()
    (tmp_path / "CR" / "train.tsv").write_text("index\ttext\tlabel\n0\tgreat phone\t1\n1\tbad \"case\"\t0\n")
    cr = data.load_examples("cr", "train", data_dir=tmp_path)
    assert [e["label"] for e in cr] == [1, 0] and cr[1]["text"] == 'bad "case"'
    assert data.to_text("cr", cr[0]) == {"inputs": "cr text: great phone", "targets": "positive"}
    (tmp_path / "CoLA").mkdir()                       # GLUE test files: a header, no label column -> -1
    (tmp_path / "CoLA" / "test.tsv").write_text("id\tsentence\n0\tHi there.\n")
    assert data.load_examples("cola", "test", data_dir=tmp_path) == [
        {"sentence": "Hi there.", "idx": 0, "label": -1}]
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "test.tsv").write_text("index\tgenre\tsentence1\tsentence2\n0\tnews\tA.\tB.\n")
    assert data.load_examples("stsb", "test", data_dir=tmp_path)[0]["label"] == -1.0
    (tmp_path / "socialiqa").mkdir()
    row = {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c"}
    (tmp_path / "socialiqa" / "dev.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "socialiqa" / "dev-labels.lst").write_text("3\n")
    assert data.load_examples("socialiqa", "validation", data_dir=tmp_path)[0]["label"] == 2


@pytest.mark.parametrize("rel,content,match", [
    ("RTE/dev.tsv", '{"premise": "P.", "hypothesis": "H.", "label": "entailment", "idx": 0}\n',
     r"RTE/dev.tsv is not laid out.*no column \['sentence1', 'sentence2'\] in the header"),
    ("MRPC/dev.tsv", "sentence1\tsentence2\tlabel\tidx\nA.\tB.\t1\t0\n",
     r"no column \['#1 String', '#2 String'\]"),
    ("SST-2/dev.tsv", "sentence\tlabel\nnice\t7\n",
     r"line 2: label '7' is neither one of \('negative', 'positive'\)"),
    ("CB/val.jsonl", "premise\thypothesis\tlabel\nP.\tH.\tentailment\n",
     r"CB/val.jsonl .*line 1: JSONDecodeError"),
    ("BoolQ/val.jsonl", '{"question": "q?", "idx": 0, "label": true}\n',
     r"line 1: KeyError: 'passage'.*super\.glue"),
    ("CB/val.jsonl", '{"premise": "P.", "hypothesis": "H.", "label": "maybe", "idx": 0}\n',
     r"label 'maybe' is neither"),
    ("dev.json", '{"premise": "P.", "hypothesis": "H.", "label": "entailment"}', "a .json list of objects")])
def test_files_in_another_layout_name_the_file_and_the_problem(tmp_path, rel, content, match):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(content)
    folder = rel.split("/")[0]
    task = {"RTE": "rte", "MRPC": "mrpc", "SST-2": "sst2", "CB": "cb", "BoolQ": "boolq"}.get(folder, "docnli")
    with pytest.raises(ValueError, match=match):
        data.load_examples(task, "validation", data_dir=tmp_path)


@pytest.mark.parametrize("rel,content,match", [
    ("SST-2/dev.tsv", "sentence\tlabel\nnice\t1\nbad\t0\nodd\t7\n", "line 4: label '7'"),   # header = line 1
    ("CoLA/dev.tsv", "gj04\t1\t\tFine.\ngj04\t9\t\tOdd.\n", "line 2: label '9'"),         # no header
    ("CR/validation.tsv", "index\ttext\tlabel\n0\tok\t1\n1\tbad\t5\n", "line 3: label '5'"),
    ("socialiqa/dev.jsonl", '{"context": "C", "label": 1}\n\n{"context": "D", "label": 9}\n',
     "line 3: label 9"),
    ("dev.json", '[{"premise": "P", "label": "entailment"}, {"premise": "Q", "label": "?"}]',
     "record 2: label '\\?'")])
def test_data_errors_name_the_line_of_the_file(tmp_path, rel, content, match):
    """"row N" counted examples from 0; an error now names the file's line (1-based, the header included),
    or for a .json list the record (1-based)."""
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(content)
    task = {"SST-2": "sst2", "CoLA": "cola", "CR": "cr", "socialiqa": "socialiqa"}.get(rel.split("/")[0],
                                                                                       "docnli")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / rel))} .*{match}"):
        data.load_examples(task, "validation", data_dir=tmp_path)


def test_tsv_fields_longer_than_128_kib_are_read(tmp_path):
    """Python's csv stops at fields over 128 KiB (`_csv.Error: field larger than field limit`): a long
    document in a GLUE-style .tsv or a records .tsv is read whole."""
    long = "word " * 40_000                                                    # 200,000 characters
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text(f"sentence\tlabel\nshort\t1\n{long}\t0\nend\t1\n")
    assert [len(e["sentence"]) for e in data.load_examples("sst2", "validation", tmp_path)] == [5, 200_000, 3]
    (tmp_path / "CR").mkdir()
    (tmp_path / "CR" / "validation.tsv").write_text(f"index\ttext\tlabel\n0\t{long}\t0\n1\tok\t1\n")
    assert [len(e["text"]) for e in data.load_examples("cr", "validation", tmp_path)] == [200_000, 2]


def test_jsonl_with_blank_lines_or_a_byte_order_mark_is_read(shared_data, tmp_path):
    """Editors add a UTF-8 BOM or a trailing blank line; both were refused ('Unexpected UTF-8 BOM', a
    JSONDecodeError on the empty line). The examples are the same as from the original file."""
    want = data.load_examples("cb", "validation", shared_data / "superglue")
    lines = (shared_data / "superglue" / "CB" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "CB").mkdir()
    (tmp_path / "CB" / "val.jsonl").write_text("\ufeff" + "\n\n".join(lines) + "\n\n", encoding="utf-8")
    assert data.load_examples("cb", "validation", tmp_path) == want
    (tmp_path / "socialiqa").mkdir()
    row = json.dumps({"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c"})
    (tmp_path / "socialiqa" / "dev.jsonl").write_text(f"\ufeff{row}\n\n{row}\n", encoding="utf-8")
    (tmp_path / "socialiqa" / "dev-labels.lst").write_text("3\n1\n")
    assert [e["label"] for e in data.load_examples("socialiqa", "validation", tmp_path)] == [2, 0]
    (tmp_path / "dev.json").write_text('\ufeff[{"premise": "P.", "hypothesis": "H.", "label": "entailment"}]',
                                       encoding="utf-8")
    assert data.load_examples("docnli", "validation", tmp_path)[0]["label"] == 1


def test_labels_file_must_label_every_record(tmp_path):
    (tmp_path / "socialiqa").mkdir()
    row = json.dumps({"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c"})
    (tmp_path / "socialiqa" / "dev.jsonl").write_text(f"{row}\n{row}\n")
    (tmp_path / "socialiqa" / "dev-labels.lst").write_text("3\n")              # zip() would drop record 2
    with pytest.raises(ValueError, match="has 1 labels for the 2 records"):
        data.load_examples("socialiqa", "validation", data_dir=tmp_path)


# ----------------------------------------------------------------------------- the tfds path, offline
MNLI_TSV = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
            "0\t1\t1n\tfiction\t(x)\t(y)\t"
            "(x)\t(y)\tA man sleeps.\tA man runs.\tcontradiction\tcontradiction\n")


def _structure(x):
    if isinstance(x, dict):
        return {k: _structure(v) for k, v in x.items()}
    return float if isinstance(x, float) else type(x)


@pytest.mark.parametrize("task,split", [("rte", "train"), ("sst2", "validation"),
                                        ("mnli", "validation_matched"), ("multirc", "validation")])
def test_tfds_mock_gives_the_file_readers_structure(shared_data, tmp_path, task, split):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        from_tfds = data.load_examples(task, split)
    if task == "mnli":                              # no MNLI in shared data: a one-row file in GLUE's layout
        (tmp_path / "MNLI").mkdir()
        (tmp_path / "MNLI" / "dev_matched.tsv").write_text(MNLI_TSV)
        root = tmp_path
    else:
        root = shared_data
    from_files = data.load_examples(task, split, data_dir=root)
    assert len(from_tfds) == 3
    assert _structure(from_tfds[0]) == _structure(from_files[0])
    assert set(data.to_text(task, from_tfds[0])) == {"inputs", "targets"}
    if task == "mnli":
        assert from_files[0] == {
            "premise": "A man sleeps.", "hypothesis": "A man runs.", "idx": 0, "label": 2}


def _fake_download(tmp_path, shared_data, folder, files):
    """A download folder for tfds: real shared files linked in, stand-ins (text) for the splits not shared."""
    (tmp_path / "dl" / folder).mkdir(parents=True)
    for name, content in files.items():
        target = tmp_path / "dl" / folder / name
        if isinstance(content, Path):
            target.symlink_to(shared_data / content)
        else:
            target.write_text(content)
    return str(tmp_path / "dl")


# A ReCoRD record in the SuperGLUE layout (no ReCoRD file is shared): entity spans are inclusive character
# offsets, repeated spans and answers collapse, "@highlight" lines follow the passage.
RECORD_LINE = json.dumps({"source": "Daily mail", "idx": 3, "passage": {
    "text": "Obama met Merkel in Paris.\n@highlight\nBig day", "entities": [
        {"start": 0, "end": 4}, {"start": 10, "end": 15}, {"start": 20, "end": 24}, {"start": 0, "end": 4}]},
    "qas": [{"query": "@placeholder met Merkel", "idx": 7, "answers": [
        {"start": 0, "end": 4, "text": "Obama"}, {"start": 0, "end": 4, "text": "Obama"}]},
            {"query": "Obama met @placeholder in Paris", "idx": 8, "answers": [
                {"start": 10, "end": 15, "text": "Merkel"}]}]}) + "\n"


@pytest.mark.parametrize("task,folder,files", [
    ("rte", "RTE", {"dev.tsv": Path("glue/RTE/dev.tsv"),
                    "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n",
                    "test.tsv": "index\tsentence1\tsentence2\n0\tA.\tB.\n"}),
    ("multirc", "MultiRC", {"val.jsonl": Path("superglue/MultiRC/val.jsonl")}),
    ("record", "ReCoRD", {f"{s}.jsonl": RECORD_LINE for s in ("train", "val", "test")})])
def test_real_tfds_build_equals_file_reader(shared_data, tmp_path, task, folder, files):
    """tfds builds the split from the original files (download replaced by a local folder), writes
    array_record (bytes come back, lists of bytes for ReCoRD's entities/answers) and gives exactly the file
    reader's examples, in its own (shuffled) order."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from unittest import mock
    if task == "multirc":          # tfds reads every split: give train/test one real paragraph each
        line = (shared_data / "superglue/MultiRC/val.jsonl").open().readline()
        files = {**files, "train.jsonl": line, "test.jsonl": line}
    dl = _fake_download(tmp_path, shared_data, folder, files)
    # the download is replaced, so is the check that the network is reachable (data.online)
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=dl), \
            mock.patch.object(data, "online", return_value=True):
        from_tfds = data.load_examples(task, "validation", tfds_dir=str(tmp_path / "tfds"))
    from_files = data.load_examples(task, "validation", data_dir=dl)      # the same files, read by data.py
    key = {"multirc": lambda e: (e["idx"]["paragraph"], e["idx"]["question"], e["idx"]["answer"]),
           "record": lambda e: e["idx"]["query"]}.get(task, lambda e: e["idx"])
    assert sorted(from_tfds, key=key) == from_files
    # The lazy path: example i read from array_record when asked for, same order as above.
    if task == "rte":
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=dl), \
                mock.patch.object(data, "online", return_value=True):
            lazy = data.load_pairs(task, "validation", tfds_dir=str(tmp_path / "tfds"))
            reads = data.data_fingerprint(task, "validation", tfds_dir=str(tmp_path / "tfds"))
        assert isinstance(lazy, data.LazyPairs) and list(lazy) == data.text_pairs(task, from_tfds)
        assert reads == {"tfds": "glue/rte", "split": "validation", "examples": [len(from_files)]}
    if task == "record":
        assert [(e["entities"], e["answers"]) for e in from_files] == [
            (["Merkel", "Obama", "Paris"], ["Obama"]), (["Merkel", "Obama", "Paris"], ["Merkel"])]
        assert data.to_text("record", from_tfds[0])["inputs"].endswith(
            "entities: Merkel, Obama, Paris passage: Obama met Merkel in Paris. Big day")


def test_tfds_not_prepared_fails_fast_with_a_hint(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(OSError, match="could not load glue/rte.*--data DIR"):
        data.load_examples("rte", "validation", tfds_dir=str(tmp_path), download=False)


def test_tfds_offline_fails_within_seconds_in_one_line_naming_data_and_fetch(tmp_path, monkeypatch):
    """Offline, tfds retried its downloads for minutes, then a long traceback; now a connection test of a few
    seconds, then one line naming --data DIR and the fetch command."""
    pytest.importorskip("tensorflow_datasets")
    import socket

    def unreachable(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as e:
        data.load_examples("sst2", "validation", tfds_dir=str(tmp_path))
    assert time.perf_counter() - start < 30
    message = str(e.value)
    assert "network is unreachable" in message and "--data DIR" in message and "\n" not in message
    assert f"python3 data.py fetch glue` caches them: --data {data.data_root() / 'glue'}" in message


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_superglue_tfds_without_tensorflow_says_how_to_install():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ModuleNotFoundError, match="pip install tensorflow-cpu"):
        data.load_examples("boolq", "validation")


# ----------------------------------------------------------------------------- tokens and batches
@pytest.fixture(scope="module")
def vocab(shared_data):
    return data.load_vocab(str(shared_data / "t5_spiece.model"))


def test_vocab_known_ids_and_sentinels(vocab, shared_data, tmp_path):
    assert vocab.encode("Hello world") == [8774, 296]
    assert vocab.encode("translate English to German: That is good.") == [
        13959, 1566, 12, 2968, 10, 466, 19, 207, 5]
    assert vocab.vocab_size == 32100
    assert vocab.encode("<extra_id_0>") == [32099] and vocab.encode("<extra_id_99>") == [32000]
    # seqio's sentinel pieces are "▁<extra_id_i>": no stray '▁' (id 3) before a sentinel after a space
    assert vocab.encode("a <extra_id_0> b") == [3, 9, 32099, 3, 115]
    assert vocab.decode([3, 9, 32099, 3, 115, 1]) == "a <extra_id_0> b"
    assert vocab.decode([8774, 296, 1, 296, 0]) == "Hello world"
    # ids past the vocabulary (logits have 32128 rows) decode as unknown, as in seqio: never silently dropped
    assert vocab.decode([0, 1465, 32110, 1]) == "positive ⁇ " and vocab.encode("positive") == [1465]
    (tmp_path / "spiece.model").symlink_to(shared_data / "t5_spiece.model")
    assert data.load_vocab(str(tmp_path)).encode("Hello world") == [8774, 296]
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        data.load_vocab(str(tmp_path / "missing.model"))


def test_load_vocab_names_a_file_that_is_no_sentencepiece_model(tmp_path):
    """--vocab x.npy, a text file, an empty .model: a one-line ValueError naming the file, not protobuf's
    DecodeError or sentencepiece's RuntimeError."""
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "spiece.model").write_bytes(b"\x00\x01garbage")
    for name in ("x.npy", "notes.txt", "empty.model", "folder"):
        path = tmp_path / name / "spiece.model" if name == "folder" else tmp_path / name
        not_spm = rf"^{re.escape(str(path))} is not a SentencePiece model .*\.model"
        with pytest.raises(ValueError, match=not_spm) as e:
            data.load_vocab(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_load_vocab_offline_hub_error_says_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"google/t5-base-lm-adapt.*t5_spiece\.model.*SPOT_VOCAB"):
        data.load_vocab("google/t5-base-lm-adapt")


def test_load_vocab_default_follows_spot_vocab(monkeypatch, shared_data, tmp_path):
    monkeypatch.setenv("SPOT_VOCAB", str(shared_data / "t5_spiece.model"))
    assert data.load_vocab().encode("Hello world") == [8774, 296]
    monkeypatch.setenv("SPOT_VOCAB", str(tmp_path / "moved.model"))       # not the vocabulary cached above
    with pytest.raises(FileNotFoundError, match="moved.model"):
        data.load_vocab()


def test_tokenize_eos_truncation_padding(vocab):
    out = data.tokenize(vocab, [{"inputs": "Hello world", "targets": "positive"},
                                {"inputs": "Hello", "targets": "translate English to German"}], 4, 3)
    assert out["inputs"].dtype == np.int32 and out["targets"].dtype == np.int32
    np.testing.assert_array_equal(out["inputs"], [[8774, 296, 1, 0], [8774, 1, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[1465, 1, 0], [13959, 1566, 1]])   # cut to T-1, then EOS
    cut = data.tokenize(vocab, [{"inputs": "Hello world", "targets": "x"}], 2, 8)
    np.testing.assert_array_equal(cut["inputs"], [[8774, 1]])


def toy_arrays(n, width=3, fill=0):
    return data.ArraySource(np.arange(n * width, dtype=np.int32).reshape(n, width) + fill,
                            np.full((n, 2), fill, np.int32))


def test_batches_deterministic_resumable_and_epoch_permutations():
    def take(it, k):
        return [next(it) for _ in range(k)]
    arrays = toy_arrays(10)
    a = take(data.batches(arrays, 4, seed=7), 8)
    b = take(data.batches(arrays, 4, seed=7), 8)
    resumed = take(data.batches(arrays, 4, seed=7, start=5), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    for x, y in zip(a[5:], resumed):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    rows = np.concatenate([x["inputs"][:, 0] // 3 for x in a])            # 32 rows = 3.2 epochs of 10
    for e in range(3):
        assert sorted(rows[10 * e:10 * e + 10]) == list(range(10))        # every epoch is a permutation
    other = take(data.batches(arrays, 4, seed=8), 3)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, other))


def test_batches_hold_no_index_array(monkeypatch):
    """Batch k costs O(batch) for any n: no permutation of all n rows (393K for MNLI, 50M+ for WMT/C4)."""
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: pytest.fail("batches() drew a permutation"))
    huge = data.LazyPairs(10 ** 12, lambda i: {"inputs": f"example {i}", "targets": "x"})
    rows = data.batch_rows(len(huge), 8, seed=11, k=10 ** 9)
    assert len(set(rows.tolist())) == 8 and (0 <= rows).all() and (rows < 10 ** 12).all()
    np.testing.assert_array_equal(rows, data.batch_rows(len(huge), 8, seed=11, k=10 ** 9))
    assert huge[int(rows[0])]["inputs"] == f"example {rows[0]}"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1009])
def test_permute_is_a_bijection_keyed_by_seed_and_epoch(n):
    perm = data.permute(np.arange(n), n, seed=5, epoch=2)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 64:     # another key gives another order; chance of equality is 1/n!
        assert (perm != data.permute(np.arange(n), n, seed=6, epoch=2)).any()
        assert (perm != data.permute(np.arange(n), n, seed=5, epoch=3)).any()
        assert (perm != np.arange(n)).mean() > 0.9          # a shuffle, not (nearly) the identity


def test_bucket_lengths_four_per_octave_and_capped():
    lengths = sorted({data.bucket_length(n, 512) for n in range(1, 600)})
    assert lengths == [8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224,
                       256, 320, 384, 448, 512]
    assert [data.bucket_length(n, 512) for n in (1, 9, 17, 61, 65, 447)] == [8, 10, 20, 64, 80, 448]
    assert data.bucket_length(61, 48) == 48 and data.bucket_length(3, 5) == 5
    assert all(n <= data.bucket_length(n, 512) <= 1.25 * max(n, 8) for n in range(1, 513))


def test_text_source_batches_pad_to_the_bucket_of_their_longest_row(shared_data, vocab):
    pairs = data.load_pairs("rte", "train", shared_data / "glue", train=True)
    examples = data.load_examples("rte", "train", shared_data / "glue")
    assert pairs == data.text_pairs("rte", examples, train=True)
    source = data.TextSource(pairs, vocab, max_input_len=128, max_target_len=8)
    full = data.tokenize(vocab, pairs, 128, 8)                    # the same rows, padded to 128
    widths = set()
    for k, batch in zip(range(12), data.batches(source, 8, seed=3)):
        rows = data.batch_rows(len(pairs), 8, 3, k)
        longest = max(int((full["inputs"][r] != 0).sum()) for r in rows)
        assert batch["inputs"].shape == (8, data.bucket_length(longest, 128))
        assert batch["targets"].shape == (8, 8)
        width = batch["inputs"].shape[1]
        np.testing.assert_array_equal(batch["inputs"], full["inputs"][rows, :width])
        assert (full["inputs"][rows, width:] == 0).all()
        widths.add(width)
    assert len(widths) >= 2                                       # RTE: batches change bucket
    arrays = next(data.batches(data.ArraySource(**full), 8, seed=3, start=5))   # tokenize's arrays alike
    np.testing.assert_array_equal(arrays["inputs"], next(data.batches(source, 8, seed=3, start=5))["inputs"])


def test_each_process_gets_its_rows_of_the_global_batch(shared_data, vocab):
    superglue = shared_data / "superglue"
    source = data.TextSource(data.load_pairs("cb", "train", superglue, train=True), vocab, 256, 8)
    mix = {"cb": source, "copa": data.TextSource(data.load_pairs("copa", "train", superglue), vocab)}
    for make in (lambda **kw: data.batches(source, 12, 4, start=7, **kw),
                 lambda **kw: data.mixture_batches(mix, 12, 4, start=7, **kw)):
        whole = next(make())
        parts = [next(make(process_index=i, process_count=3)) for i in range(3)]
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_data_fingerprint_tells_files_apart(shared_data, tmp_path):
    a = data.data_fingerprint("rte", "train", shared_data / "glue")
    assert a == data.data_fingerprint("rte", "train", shared_data / "glue") and a["file"] == "train.tsv"
    lines = (shared_data / "glue" / "RTE" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("".join(lines[:100]), encoding="utf-8")
    assert data.data_fingerprint("rte", "train", tmp_path) != a


def test_data_fingerprint_sees_an_edit_in_the_middle_of_a_large_file(tmp_path):
    """The fingerprint hashed only the first and last MiB, so an edit in between resumed on other data."""
    (tmp_path / "SST-2").mkdir()
    path = tmp_path / "SST-2" / "train.tsv"
    rows = [f"sentence number {i:07d} of a long file\t{i % 2}\n" for i in range(120_000)]   # 4.4 MB
    path.write_text("sentence\tlabel\n" + "".join(rows))
    before = data.data_fingerprint("sst2", "train", tmp_path)
    rows[60_000] = rows[60_000].replace("\t0", "\t1")                            # one label, mid-file
    path.write_text("sentence\tlabel\n" + "".join(rows))
    after = data.data_fingerprint("sst2", "train", tmp_path)
    assert after["bytes"] == before["bytes"] > 3 << 20 and after != before


def test_a_mixture_leaves_out_a_task_without_examples():
    arrays, empty = toy_arrays(3), toy_arrays(0)
    assert next(data.mixture_batches({"a": arrays, "b": empty}, 4, 0))["inputs"].shape == (4, 3)


# ----------------------------------------------------------------------------- mixtures
def test_mixture_rates_with_and_without_cap():
    assert data.mixture_rates({"a": 100, "b": 300, "c": 600}) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert data.mixture_rates({"a": 100, "b": 300, "c": 600}, cap=200) == pytest.approx(
        {"a": 0.2, "b": 0.4, "c": 0.4})                                  # min(n, K): 100, 200, 200 of 500
    rates = data.mixture_rates({"mnli": 392_702, "c4": 365_000_000})      # default K = 2^19 = 524,288
    assert rates["mnli"] == pytest.approx(392_702 / (392_702 + 524_288))


def test_mixture_of_text_sources_resumes_and_pads_to_the_batch_bucket(shared_data, vocab):
    mix = {t: data.TextSource(data.load_pairs(t, "train", shared_data / folder, train=True), vocab, 512, 8)
           for t, folder in (("sst2", "glue"), ("rte", "glue"), ("wsc", "superglue"))}
    got = [b for _, b in zip(range(6), data.mixture_batches(mix, 16, seed=2))]
    again = next(data.mixture_batches(mix, 16, seed=2, start=4))
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(got[4][key], again[key])
    for b in got:
        longest = int((b["inputs"] != 0).sum(1).max())
        assert b["inputs"].shape[1] == data.bucket_length(longest, 512)
        assert b["targets"].shape[1] == data.bucket_length(int((b["targets"] != 0).sum(1).max()), 16)


def test_mixture_batches_rates_resume_and_padding():
    arrays = {"small": toy_arrays(5, width=2, fill=1000), "large": toy_arrays(50, width=4, fill=2000)}
    rates = {"small": 0.25, "large": 0.75}
    it = data.mixture_batches(arrays, 64, seed=3, rates=rates)
    got = [next(it) for _ in range(60)]
    again = data.mixture_batches(arrays, 64, seed=3, rates=rates, start=40)
    np.testing.assert_array_equal(got[40]["inputs"], next(again)["inputs"])
    inputs = np.concatenate([g["inputs"] for g in got])
    assert inputs.shape[1] == 4
    small = inputs[:, 0] < 2000
    assert abs(small.mean() - 0.25) < 0.02
    assert (inputs[small][:, 2:] == 0).all()                                # narrow task padded with 0


# ----------------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    assert data.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {"accuracy": 50.0}
    # invalid prediction -1 (target 0) is flipped to 1: tp=2 fp=2 fn=1 -> 2*2/(2*2+3)
    assert data.f1_with_invalid([1, 1, 0, 0, 1], [1, 0, 1, -1, 1])["f1"] == pytest.approx(400 / 7)
    # per class: 2/3, 2/3, 4/5
    assert data.mean_class_f1([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, -1])["mean_3class_f1"] == pytest.approx(
        100 * (2 / 3 + 2 / 3 + 0.8) / 3)
    assert data.matthews([1, 1, 0, 0], [1, 0, 0, 0])["matthews_corrcoef"] == pytest.approx(
        100 * 2 / np.sqrt(12))
    assert data.matthews([1, 1, 0, 0], [0, 0, 0, 0])["matthews_corrcoef"] == 0.0
    # invalid -1 makes it a 3-label table: (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = 6 / sqrt(10 * 8)
    assert data.matthews([1, 1, 0, 0], [1, -1, 0, 0])["matthews_corrcoef"] == pytest.approx(
        100 * 6 / np.sqrt(80))


def test_correlations_by_hand_and_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    assert data.pearson([1, 2, 3], [2, 4, 6])["pearson_corrcoef"] == pytest.approx(100)
    assert data.spearman([1, 2, 3], [30, 20, 10])["spearman_corrcoef"] == pytest.approx(-100)
    rng = np.random.default_rng(0)
    t = np.round(rng.uniform(0, 5, 200) * 5) / 5                            # STS-B-like ties
    p = np.round((t + rng.normal(0, 1, 200)) * 5) / 5
    assert data.pearson(t, p)["pearson_corrcoef"] == pytest.approx(100 * stats.pearsonr(t, p)[0])
    assert data.spearman(t, p)["spearman_corrcoef"] == pytest.approx(100 * stats.spearmanr(t, p)[0])
    p[3] = np.nan                                                           # T5 parses the prediction "nan"
    assert np.isnan(data.spearman(t, p)["spearman_corrcoef"]) and np.isnan(stats.spearmanr(t, p)[0])


def test_squad_multirc_record_by_hand():
    assert data.normalize_squad("The  Denver Broncos!") == "denver broncos"
    out = data.squad([["Denver Broncos", "Broncos"], ["Denver Broncos"]], ["the Broncos", "Broncos"])
    assert out == pytest.approx({"em": 50.0, "f1": 100 * (1 + 2 / 3) / 2})   # P=1, R=1/2 -> F1 2/3
    mrc = data.multirc([(1, "q1"), (0, "q1"), (1, "q2"), (1, "q2")], [1, 0, 1, 0])
    assert mrc == pytest.approx({"f1": 80.0, "exact_match": 50.0})
    rec = data.record([(["Obama"], (0, 0)), (["Obama"], (0, 0)), (["Paris", "France"], (0, 1))],
                      ["Obama", "wrong", "france"])                           # duplicate group counted once
    assert rec == pytest.approx({"em": 100.0, "f1": 100.0})


def test_score_postprocesses_and_averages(shared_data):
    mrpc = data.load_examples("mrpc", "validation", data_dir=shared_data)[:4]
    gold = [data.to_text("mrpc", e)["targets"] for e in mrpc]
    out = data.score("mrpc", mrpc, gold[:3] + ["banana"])                   # unknown string -> -1, wrong
    assert out["accuracy"] == 75.0 and out["score"] == pytest.approx((out["f1"] + 75.0) / 2)
    sts = [{"sentence1": "a", "sentence2": "b", "label": x, "idx": i} for i, x in enumerate([1.0, 2.0, 3.0])]
    assert data.score("stsb", sts, ["1.0", "2.0", "3.0"])["score"] == pytest.approx(100)
    wsc = {"text": "Mitchell asked Tom if he could lend some money.", "span1_index": 2, "span2_index": 4,
           "span1_text": "Tom", "span2_text": "he", "idx": 0}
    both = data.score("wsc", [{**wsc, "label": 1}, {**wsc, "label": 0}], ["the Tom", "Tom"])
    assert both["accuracy"] == 50.0
    with pytest.raises(NotImplementedError, match="c4"):
        data.score("c4", [{"text": "a b"}], ["b"])


def test_score_refuses_unlabelled_input():
    test_split = [{"sentence": "Hi.", "idx": i, "label": -1} for i in range(3)]
    with pytest.raises(ValueError, match="3 of 3 examples have no label.*validation"):
        data.score("cola", test_split, ["acceptable"] * 3)              # would silently score 0
    query = {"passage": "P.", "query": "@placeholder", "entities": ["A"], "answers": [],
             "idx": {"passage": 0, "query": 0}}
    with pytest.raises(ValueError, match="have no label"):               # T5: max() of no answers
        data.score("record", [query], ["A"])
    snli = [{"premise": "P.", "hypothesis": "H.", "label": -1},
            {"premise": "P.", "hypothesis": "H.", "label": 0}]
    # tfds SNLI: some -1 labels, as T5
    assert data.score("snli", snli, ["entailment"] * 2)["accuracy"] == 50.0


def test_stsb_score_uses_rounded_targets_and_minus_one_for_text():
    """T5: targets are the rounded label strings back to floats; a prediction that is no number is -1.0."""
    stats = pytest.importorskip("scipy.stats")
    labels, preds = [0.1, 1.79, 2.5, 3.8, 4.96], ["0.4", "banana", "2.6", "", "5.0"]
    sts = [{"sentence1": "a", "sentence2": "b", "label": x, "idx": i} for i, x in enumerate(labels)]
    t, p = [0.0, 1.8, 2.4, 3.8, 5.0], [0.4, -1.0, 2.6, -1.0, 5.0]      # 2.5 -> 2.4: round half to even
    out = data.score("stsb", sts, preds)
    assert out["pearson_corrcoef"] == pytest.approx(100 * stats.pearsonr(t, p)[0])
    assert out["spearman_corrcoef"] == pytest.approx(100 * stats.spearmanr(t, p)[0])


def test_bleu_and_rouge_by_hand():
    # ref "the cat sat on the mat", hyp "... a mat": n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths (BP = 1)
    ref, hyp = "the cat sat on the mat", "the cat sat on a mat"
    assert data.bleu([ref], [hyp])["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert data.bleu([ref], [ref])["bleu"] == pytest.approx(100)
    # "the cat sat" vs ref: 3 of 6 unigrams (P 1, R 1/2), 2 of 5 bigrams (P 1, R 2/5), LCS 3
    out = data.rouge([ref], ["the cat sat"])
    assert out == pytest.approx({"rouge1": 100 * 2 / 3, "rouge2": 100 * 0.8 / 1.4, "rougeLsum": 100 * 2 / 3})
    # rougeLsum is the union LCS over sentences: " . " ends a sentence (T5 _prepare_summary)
    two = data.rouge(["a b . c d"], ["c d . a b"])
    assert two["rougeLsum"] == pytest.approx(100) and two["rouge1"] == pytest.approx(100)
    xsum = data.score("xsum", [{"document": "x", "summary": ref}, {"document": "y", "summary": ref}],
                      [ref, "the cat sat"])
    assert xsum["rouge1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert xsum["score"] == pytest.approx((xsum["rouge1"] + xsum["rouge2"] + xsum["rougeLsum"]) / 3)


def test_output_labels_are_the_strings_the_model_is_trained_to_write():
    """Rank classification and the class_labels init use output_labels: the target strings of
    classification tasks. WSC has label names only to read its files' True/False labels; its target is
    the referent (span1_text)."""
    assert data.get_task("wsc").label_names == ("False", "True")
    assert data.get_task("wsc").output_labels is None
    assert data.get_task("boolq").output_labels == ("False", "True")
    assert data.get_task("multirc").output_labels == ("False", "True")
    assert data.get_task("stsb").output_labels is None and data.get_task("record").output_labels is None
    ex = {"text": "Mark told Pete many lies about himself, which Pete included in his book. "
                  "He should have been more skeptical.",
          "span1_index": 2, "span2_index": 17, "span1_text": "Pete", "span2_text": "He", "label": 1, "idx": 0}
    target = data.get_task("wsc").preprocess(ex)["targets"]
    assert target == "Pete" and target not in data.get_task("wsc").label_names


# ----------------------------------------------------------------------------- C4: prefix LM, streams
def counting_docs(read):
    """open_docs of a DocStream over endless generated documents; `read` collects the indices it yields."""
    def open_docs(start):
        for i in itertools.count(start):
            read.append(i)
            yield f"document {i} " + " ".join(f"w{i % 97}x{j}" for j in range(i % 60))
    return open_docs


def test_prefix_lm_in_token_space_cuts_a_segment_of_the_document(vocab):
    docs = [" ".join(f"t{i}y{j}" for j in range(n)) for i, n in enumerate((3, 40, 400, 1))]
    src = data.PrefixLMSource(docs, vocab, max_input_len=32, max_target_len=64, seed=4)
    for i, doc in enumerate(docs):
        x, y = src.example_ids(i)
        assert x[-1] == y[-1] == data.EOS_ID and (x, y) == src.example_ids(i)     # keyed by (seed, i)
        seg, ids = x[:-1] + y[:-1], vocab.encode(doc)
        # one segment of 31 tokens of the document
        assert len(seg) <= 31 and any(ids[s:s + len(seg)] == seg for s in range(0, len(ids), 31))
        assert 1 <= len(x) - 1 <= max(1, len(seg) - 1)                            # T5: prefix in [1, L-1]
    cuts = {len(src.example_ids(2)[0]) for src in
            (data.PrefixLMSource(docs, vocab, 32, 64, seed=s) for s in range(12))}
    assert len(cuts) > 3                                                           # the cut point is drawn


def test_doc_stream_reads_only_up_to_the_batch_and_resumes(vocab):
    read = []
    src = data.PrefixLMSource(data.DocStream(counting_docs(read), seed=3, window=64), vocab, 32, 16, seed=3)
    got = [b for _, b in zip(range(10), data.batches(src, 16, seed=3))]     # positions 0..159: windows 0-2
    assert max(read) < 3 * 64                                                 # nothing past the third window
    assert sorted(data.permute(np.arange(64), 64, 3, 1)) == list(range(64))
    read.clear()
    stream = data.DocStream(counting_docs(read), seed=3, window=64)
    again = next(data.batches(data.PrefixLMSource(stream, vocab, 32, 16, seed=3), 16, seed=3, start=7))
    assert min(read) == 64 and max(read) < 128                                # reopened at batch 7's window
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(got[7][key], again[key])


def test_mixture_with_a_stream_resumes_exactly(shared_data, vocab):
    def mix():
        c4 = data.PrefixLMSource(data.DocStream(counting_docs([]), seed=0, window=32), vocab, 64, 16)
        cola = data.TextSource(data.load_pairs("cola", "train", shared_data / "glue"), vocab, 64, 8)
        return {"c4": c4, "cola": cola}
    rates = {"c4": 0.5, "cola": 0.5}
    got = [b for _, b in zip(range(9), data.mixture_batches(mix(), 8, seed=5, rates=rates))]
    again = next(data.mixture_batches(mix(), 8, seed=5, start=6, rates=rates))
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(got[6][key], again[key])


def test_c4_from_json_gz_files(tmp_path, vocab):
    import gzip
    (tmp_path / "c4" / "en").mkdir(parents=True)
    for shard in range(2):
        with gzip.open(tmp_path / "c4" / "en" / f"c4-train.{shard:05d}-of-00002.json.gz", "wt") as f:
            for i in range(50):
                doc = {"text": f"shard {shard} doc {i} " + "more words here " * i, "url": "x"}
                f.write(json.dumps(doc) + "\n")
    src = data.train_source("c4", vocab, 64, 0, data_dir=tmp_path)
    assert isinstance(src, data.PrefixLMSource) and src.max_target_len == data.get_task("c4").target_len
    texts = [src.docs[p] for p in range(100)]
    written = [f"shard {s} doc {i} " + "more words here " * i for s in range(2) for i in range(50)]
    assert sorted(texts) == sorted(written)
    b = next(data.batches(src, 4, seed=0))
    assert b["inputs"].shape[0] == 4 and (b["inputs"][:, 0] != 0).all()
    with pytest.raises(FileNotFoundError, match="allenai/c4"):
        data.train_source("c4", vocab, 64, 0, data_dir=tmp_path / "c4" / "en" / "none")
