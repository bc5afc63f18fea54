"""The paper's numbers, in one place: Vu et al. 2022 (SPoT, arXiv 2110.07904v2 = ACL 2022 text).

Transcribed by hand from the paper's tables (arXiv 2110.07904v2; this module reads no file, so a fresh
clone has the numbers). Each block names its table. Scores are on validation sets,
x100, mean and std over 3 runs unless stated. Tests (tests/test_paper_numbers.py) check these against
the project's own code; experiments print them beside their results. RESULTS_SCHEMA (below) is the
format every experiments/*.py writes, and paper_rows(experiment) the rows it is compared with.
"""

PROMPT_LENGTH = 100  # §2.1: L = 100 prompt tokens
SIZES = ("small", "base", "large", "xl", "xxl")
HUB_IDS = {size: f"google/t5-{size}-lm-adapt" for size in SIZES}  # §2.1: frozen T5 1.1 LM-adapted
# Prompt parameters = 100 x d_model (Lester et al. 2021 Table 4; the paper's "410K" at XXL).
PROMPT_PARAMS = {"small": 51_200, "base": 76_800, "large": 102_400, "xl": 204_800, "xxl": 409_600}

# Table 1 (T5 Base): row -> ((GLUE mean, std), (SuperGLUE mean, std)). Rows "-30K" use S = 30K steps,
# the others S = 2^18. "PromptTuning" = prompt tuned on the target only; the rest are SPoT sources.
TABLE1 = {
    "PromptTuning":            ((81.2, 0.4), (66.6, 0.2)),
    "PromptTuning-30K":        ((78.4, 1.7), (63.1, 1.1)),  # = Lester et al.'s setup
    "GLUE":                    ((82.8, 0.2), (73.2, 0.3)),  # the best mixture
    "GLUE-30K":                ((82.0, 0.2), (70.7, 0.4)),
    "C4":                      ((82.0, 0.2), (67.7, 0.3)),
    "MNLI":                    ((82.5, 0.0), (72.6, 0.8)),
    "SQuAD":                   ((82.2, 0.1), (72.0, 0.4)),
    "SuperGLUE":               ((82.0, 0.1), (66.6, 0.2)),
    "NLI":                     ((82.6, 0.1), (71.4, 0.2)),
    "Paraphrasing/similarity": ((82.2, 0.1), (69.7, 0.5)),
    "Sentiment":               ((81.1, 0.2), (68.6, 0.1)),
    "MRQA":                    ((81.8, 0.2), (68.4, 0.2)),
    "RAINBOW":                 ((80.3, 0.6), (64.0, 0.4)),  # stds displaced in extraction, set by order
    "Translation":             ((82.4, 0.2), (65.3, 0.1)),
    "Summarization":           ((80.9, 0.3), (67.1, 1.0)),
    "GEM":                     ((81.9, 0.2), (70.5, 0.5)),
    "All":                     ((81.8, 0.2), (67.9, 0.9)),  # C4 + 55 supervised tasks
}

# Table 2: the 16 source and 10 target tasks of §3 (also the row/column order of Tables 6 and 7).
SOURCES = ("C4", "DocNLI", "Yelp-2", "MNLI", "QQP", "QNLI", "ReCoRD", "CxC", "SQuAD", "DROP", "SST-2",
           "WinoGrande", "HellaSWAG", "MultiRC", "CosmosQA", "RACE")
TARGETS = ("BoolQ", "CoLA", "STS-B", "WiC", "CR", "MRPC", "RTE", "WSC", "COPA", "CB")

# Table 3 (T5 Base, average over the 10 targets): row -> (abs change, std, rel change %, std,
# avg score, std). Row names: "<metric>/<method>/<k>", metrics named as in retrieval.SIMILARITIES.
# Stds of average_tokens k=12 and per_token k=1, 3 were displaced in extraction (means are clean).
# The weighted-average and mixture rows sit under the per-token block (k searched in {3,6,9,12}).
# Abs. = Avg. - 74.7 up to rounding in every row but per_token k=9 (printed 4.6 beside 79.5, i.e. +4.8).
TABLE3 = {
    "BASELINE":                      (None, None, None, None, 74.7, 0.7),
    "ORACLE":                        (6.0, 0.5, 26.5, 1.1, 80.7, 0.0),  # best of all 48 prompts
    "average_tokens/best_of_top_k/1":  (1.5, 0.5, 11.7, 1.1, 76.2, 0.1),
    "average_tokens/best_of_top_k/3":  (2.7, 0.6, 16.6, 1.1, 77.4, 0.3),
    "average_tokens/best_of_top_k/6":  (3.8, 0.1, 20.0, 1.1, 78.5, 0.5),
    "average_tokens/best_of_top_k/9":  (4.5, 0.4, 22.2, 1.1, 79.2, 0.1),
    "average_tokens/best_of_top_k/12": (5.0, 0.8, 23.6, 1.8, 79.7, 0.3),
    "average_tokens/best_of_top_k/15": (5.4, 0.9, 24.9, 2.2, 80.1, 0.4),
    "per_token/best_of_top_k/1":       (2.0, 0.4, 12.1, 1.1, 76.7, 0.7),
    "per_token/best_of_top_k/3":       (2.9, 0.6, 17.0, 0.6, 77.5, 0.4),
    "per_token/best_of_top_k/6":       (4.5, 0.5, 22.1, 1.2, 79.2, 0.1),
    "per_token/best_of_top_k/9":       (4.6, 0.5, 22.6, 0.9, 79.5, 0.2),
    "per_token/best_of_top_k/12":      (5.0, 0.6, 23.5, 1.4, 79.6, 0.1),
    "per_token/best_of_top_k/15":      (5.3, 0.9, 24.5, 2.2, 80.0, 0.4),
    "per_token/weighted_average/3":    (1.9, 0.5, 11.5, 2.7, 76.6, 0.1),
    "per_token/mixture/12":            (3.1, 0.5, 15.3, 2.8, 77.8, 0.1),
}

# Table 4 (App. A, the numbers behind Fig. 1): SuperGLUE dev average by T5 size, (mean, std).
# PromptTuning and Multi-task ModelTuning were interleaved in the extraction and decoded; their XL
# cells are a LOW-confidence reading (alternatives 88.0 +-0.9 / 79.2 +-0.5). GPT-3 (no std) is
# plotted at GPT-3's sizes, not T5's. ModelTuning rows use the original (not LM-adapted) T5 1.1.
TABLE4 = {
    "PromptDesign (GPT-3)":   {"small": (40.6, None), "base": (43.4, None), "large": (45.1, None),
                               "xl": (47.8, None), "xxl": (52.8, None)},
    "ModelTuning":            {"small": (62.8, 0.8), "base": (73.7, 0.6), "large": (81.3, 0.6),
                               "xl": (83.1, 0.2), "xxl": (89.9, 0.2)},
    "Multi-task ModelTuning": {"small": (64.6, 0.2), "base": (79.2, 0.3), "large": (84.5, 0.1),
                               "xl": (89.2, 0.5), "xxl": (90.1, 0.2)},
    "PromptTuning":           {"small": (59.8, 0.8), "base": (63.1, 1.1), "large": (74.5, 2.2),
                               "xl": (87.0, 0.9), "xxl": (88.8, 0.2)},  # Lester et al., 30K steps
    "SPoT":                   {"small": (64.5, 0.3), "base": (73.2, 0.3), "large": (82.7, 0.2),
                               "xl": (88.7, 0.3), "xxl": (91.2, 0.1)},  # GLUE-mixture source prompt
}

# Table 5 (App. D): SuperGLUE test leaderboard, 2022-02-09: model -> (total params, tuned params, score).
# Parameter counts as printed (11B, 410K, ...). Per-task columns are not transcribed.
TABLE5 = {
    "ST-MoE-32B":                 (269e9, 269e9, 91.2),
    "Turing NLR v5":              (5.4e9, 5.4e9, 90.9),
    "ERNIE 3.0":                  (12e9, 12e9, 90.6),
    "T5+UDG":                     (11e9, 11e9, 90.4),
    "DeBERTa/TuringNLRv4":        (3.1e9, 3.1e9, 90.3),
    "Human baselines":            (None, None, 89.8),
    "T5":                         (11e9, 11e9, 89.3),
    "Frozen T5 1.1 + SPoT (XXL)": (11e9, 410e3, 89.2),
    "GPT-3 few-shot":             (175e9, 0, 71.8),
    "WARP few-shot":              (223e6, 25e3, 48.7),
    "CBOW":                       (15e6, 33e3, 44.5),
}

# Table 6 (App. E, T5 Base): source -> ((mean, std) per target, in TARGETS order). Fig. 3 plots the
# relative error reduction 100 (s - b) / (100 - b) of these scores over the BASELINE row.
# Each row: BoolQ, CoLA, STS-B, WiC, CR, then MRPC, RTE, WSC, COPA, CB.
TABLE6 = {
    "BASELINE":   ((73.0, 1.2), (52.9, 1.2), (88.1, 0.6), (63.6, 1.6), (93.5, 0.2),
                   (86.1, 0.7), (68.7, 1.2), (71.5, 1.7), (56.7, 1.7), (92.7, 1.9)),
    "C4":         ((75.8, 0.5), (54.8, 1.1), (87.8, 0.6), (66.3, 0.8), (93.9, 0.1),
                   (88.0, 0.6), (69.1, 1.9), (68.0, 0.5), (54.3, 0.9), (83.1, 5.7)),
    "DocNLI":     ((72.7, 1.4), (52.7, 0.9), (87.3, 0.9), (64.7, 0.3), (93.6, 0.4),
                   (86.2, 0.8), (67.4, 2.6), (71.1, 3.6), (56.0, 5.9), (87.2, 1.7)),
    "Yelp-2":     ((74.8, 0.7), (53.9, 0.2), (88.1, 0.3), (64.7, 0.5), (93.8, 0.3),
                   (86.6, 0.8), (69.2, 1.1), (70.8, 1.2), (55.0, 0.0), (87.8, 1.6)),
    "MNLI":       ((77.6, 0.4), (54.2, 0.7), (89.5, 0.3), (69.5, 0.5), (93.9, 0.4),
                   (88.4, 0.6), (74.7, 1.3), (71.8, 3.3), (69.3, 2.1), (97.0, 1.1)),
    "QQP":        ((75.9, 0.5), (55.6, 1.3), (89.4, 0.2), (67.9, 0.2), (93.7, 0.5),
                   (88.1, 0.7), (72.0, 0.5), (71.5, 0.9), (62.0, 2.2), (88.7, 4.2)),
    "QNLI":       ((75.6, 0.5), (55.5, 2.0), (89.2, 0.2), (69.6, 1.3), (93.8, 0.2),
                   (87.8, 0.1), (71.1, 0.8), (71.5, 2.5), (59.7, 3.9), (92.5, 1.1)),
    "ReCoRD":     ((73.1, 0.9), (54.7, 1.3), (87.7, 0.7), (65.5, 0.9), (93.7, 0.1),
                   (88.7, 0.3), (67.5, 1.3), (77.2, 2.3), (59.3, 1.2), (74.1, 5.2)),
    "CxC":        ((75.9, 0.4), (55.0, 0.2), (90.0, 0.0), (70.2, 0.1), (93.9, 0.2),
                   (88.0, 0.4), (70.3, 0.5), (68.6, 2.5), (60.3, 3.9), (89.3, 2.4)),
    "SQuAD":      ((76.0, 0.7), (54.9, 1.2), (87.6, 0.1), (66.8, 0.3), (93.9, 0.5),
                   (88.7, 0.7), (71.2, 0.4), (72.4, 0.5), (63.0, 1.6), (91.3, 1.3)),
    "DROP":       ((73.6, 1.3), (53.0, 1.0), (86.9, 0.9), (67.5, 1.2), (93.7, 0.2),
                   (88.2, 0.3), (65.7, 3.1), (73.4, 2.0), (60.0, 3.6), (78.5, 8.6)),
    "SST-2":      ((73.3, 0.5), (52.3, 0.3), (87.9, 0.3), (63.8, 1.7), (93.8, 0.5),
                   (85.6, 0.9), (66.9, 1.1), (68.6, 0.4), (57.0, 2.2), (92.9, 1.3)),
    "WinoGrande": ((74.1, 0.8), (52.8, 1.6), (87.8, 0.3), (62.4, 2.5), (93.7, 0.1),
                   (86.1, 0.5), (67.9, 1.3), (71.5, 2.5), (56.7, 1.2), (83.9, 0.8)),
    "HellaSWAG":  ((70.0, 2.6), (32.7, 23.6), (87.5, 0.2), (60.1, 3.9), (93.6, 0.0),
                   (86.6, 1.4), (63.9, 5.4), (70.2, 2.1), (58.0, 2.2), (85.5, 2.6)),
    "MultiRC":    ((74.0, 0.5), (50.0, 4.6), (88.2, 0.2), (66.4, 0.5), (93.4, 0.1),
                   (86.4, 1.3), (67.6, 1.0), (69.2, 4.1), (56.0, 4.1), (80.0, 8.6)),
    "CosmosQA":   ((73.4, 1.3), (52.1, 2.3), (87.7, 0.5), (65.9, 1.0), (93.6, 0.3),
                   (87.9, 0.8), (68.7, 1.6), (69.6, 3.2), (62.3, 5.0), (83.9, 8.8)),
    "RACE":       ((73.6, 0.5), (52.5, 2.8), (87.5, 0.5), (63.1, 5.3), (93.4, 0.2),
                   (86.5, 0.8), (66.5, 2.0), (68.9, 1.2), (57.3, 1.2), (84.8, 3.4)),
}

# Table 7 (App. E): the 30 transfers with > 10% relative error reduction, (source, target, %).
TABLE7 = (
    ("MNLI", "CB", 58.9), ("MNLI", "COPA", 29.1), ("ReCoRD", "WSC", 20.0), ("MNLI", "RTE", 19.2),
    ("ReCoRD", "MRPC", 18.7), ("SQuAD", "MRPC", 18.7), ("CxC", "WiC", 18.1), ("MNLI", "BoolQ", 17.0),
    ("MNLI", "MRPC", 16.5), ("QNLI", "WiC", 16.5), ("MNLI", "WiC", 16.2), ("CxC", "STS-B", 16.0),
    ("DROP", "MRPC", 15.1), ("SQuAD", "COPA", 14.5), ("QQP", "MRPC", 14.4), ("CxC", "MRPC", 13.7),
    ("C4", "MRPC", 13.7), ("CosmosQA", "MRPC", 12.9), ("CosmosQA", "COPA", 12.9), ("QQP", "COPA", 12.2),
    ("QNLI", "MRPC", 12.2), ("QQP", "WiC", 11.8), ("MNLI", "STS-B", 11.8), ("SQuAD", "BoolQ", 11.1),
    ("QQP", "STS-B", 10.9), ("QQP", "BoolQ", 10.7), ("CxC", "BoolQ", 10.7), ("DROP", "WiC", 10.7),
    ("QQP", "RTE", 10.5), ("C4", "BoolQ", 10.4),
)

# Fig. 8 (App. G) / Fig. 5 panel titles: target -> (Pearson r, p-value) between source-target prompt
# similarity and relative error reduction, over the 48 source prompts. CB's p is printed "0.000".
FIG8 = {
    "BoolQ": (-0.07, 0.635), "CoLA": (0.028, 0.852), "STS-B": (0.708, 1.853e-08), "WiC": (0.163, 0.270),
    "CR": (0.234, 0.110), "MRPC": (0.243, 0.096), "RTE": (0.29, 0.046), "WSC": (0.428, 0.002),
    "COPA": (0.14, 0.343), "CB": (0.49, 0.000),
}

# Claims of the text, each with where it is stated and what it is computed from.
CLAIMS = {
    "glue_gain_vs_prompt_tuning_30k": 4.4,        # abstract/§2.2: Table 1, 82.8 - 78.4
    "superglue_gain_vs_prompt_tuning_30k": 10.1,  # abstract/§2.2: Table 1, 73.2 - 63.1
    "xxl_gain_vs_prompt_tuning": 2.4,             # §2.2: Table 4 XXL, 91.2 - 88.8
    "xxl_gain_vs_multitask_model_tuning": 1.1,    # §2.2: Table 4 XXL, 91.2 - 90.1
    "baseline_average": 74.7,                     # §3.1: Table 6 BASELINE row, mean of 10 targets
    "oracle_average": 80.7,                       # §3.1: best of the 48 source prompts per target
    "fewer_params_than_model_tuning": 27_000,     # abstract: XXL ~11B / 410K prompt parameters
    "more_tuned_params_than_warp": 16,            # App. D: 410K / 25K
    "search_space_eliminated_pct": 69,            # §3: top-15 of 48 prompts ...
    "oracle_gain_kept_pct": 90,                   # ... keeps 90% of the oracle's gain
    "num_source_prompts": 48,                     # §3.3: 16 source tasks x 3 runs
    "task_embedding_step": 10_000,                # §3.2 footnote 13: prompt after 10K steps
}

# Google's released prompts (google-research/prompt-tuning README; T5 1.1 LM-adapted Base, [100, 768],
# class-label init): task -> validation metrics x100.
RELEASED_PROMPTS = {
    "sst2": {"accuracy": 95.07},            # batch 128
    "mrpc": {"f1": 89.7, "accuracy": 85.3},  # batch 32
    "rte": {"accuracy": 68.6},              # batch 32
}

RESULTS_SCHEMA = """Every experiments/<name>.py writes results/<name>.json:
{"experiment": "<name>",                        # a key of EXPERIMENT_COMMANDS
 "config": {..., "tiny": false},                # dataclasses.asdict of what ran; tiny runs say so
 "results": [{"task": t, "seed": s, "source": src_or_null, "method": m,
              "score": x, "metrics": {...}}, ...],  # one record per target run
 "summary": {"<row>": {"mean": m, "std": s, "paper": p_or_null}, ...}}
Rows of "summary" are named as in paper_rows(experiment), e.g. "MNLI/SuperGLUE" (Table 1),
"SPoT/xxl" (Table 4), "MNLI/CB" (Table 6), "per_token/best_of_top_k/3" (Table 3);
rows the paper does not have are allowed and not compared."""

EXPERIMENT_COMMANDS = {
    "table1_source_mixtures": ("python3 experiments/table1_source_mixtures.py "
                               "--model google/t5-base-lm-adapt --out results"),
    "figure1_model_sizes": ("python3 experiments/figure1_model_sizes.py "
                            "--model google/t5-base-lm-adapt --out results"),
    "table6_transferability": ("python3 experiments/table6_transferability.py "
                               "--model google/t5-base-lm-adapt --out results"),
    "table3_retrieval": ("python3 experiments/table3_retrieval.py "
                         "--model google/t5-base-lm-adapt --out results"),
}


def table6(source, target):
    """(mean, std) of Table 6's cell. Example: table6("MNLI", "CB") -> (97.0, 1.1)."""
    return TABLE6[source][TARGETS.index(target)]


def paper_rows(experiment):
    """The paper's {row name: (mean, std)} that results/<experiment>.json's summary is compared with."""
    if experiment == "table1_source_mixtures":
        return {f"{row}/{bench}": cell for row, cells in TABLE1.items()
                for bench, cell in zip(("GLUE", "SuperGLUE"), cells)}
    if experiment == "figure1_model_sizes":
        return {f"{method}/{size}": cell for method, by_size in TABLE4.items()
                for size, cell in by_size.items()}
    if experiment == "table6_transferability":
        return {f"{src}/{tgt}": table6(src, tgt) for src in TABLE6 for tgt in TARGETS}
    if experiment == "table3_retrieval":
        return {row: values[4:] for row, values in TABLE3.items()}
    raise KeyError(f"unknown experiment {experiment!r}; known: {sorted(EXPERIMENT_COMMANDS)}")
