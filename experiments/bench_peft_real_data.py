"""The PEFT arm of `bench_prompt_step.py --real-data` (not run by itself): PEFT on our pipeline's token ids.

Hugging Face PEFT prompt tuning on the very token ids our pipeline reads, collated as a PEFT user would
(`DataCollatorForSeq2Seq(padding="longest")`).
Runs under a Python with torch, transformers and peft (bench_prompt_step.py's --peft-python). The model and
its optimizer are those of ../shared/bench/bench_peft_prompt_tuning.py (random T5 1.1 weights, Adafactor,
dropout).
Input: a JSON file {"batches": [[{"input_ids": [...], "labels": [...]}, ...], ...]} (ids end in EOS,
unpadded); output: {"all_s": [seconds per step], "versions": {...}}. The first --warmup batches are run
untimed.
"""
import argparse
import importlib.util
import json
import os
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peft-bench", required=True, help="../shared/bench/bench_peft_prompt_tuning.py")
    p.add_argument("--config", required=True, help="its --config: t5-small-lm-adapt, t5-base-lm-adapt")
    p.add_argument("--vocab", required=True, help="spiece.model (the collator pads with its pad id, 0)")
    p.add_argument("--batches", required=True)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import peft
    import torch
    import transformers
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, T5Tokenizer
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("peft_bench", args.peft_bench)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench_args = types.SimpleNamespace(weights=None, config=args.config, dropout=args.dropout, seed=0)
    model, _ = bench.build_model(bench_args, torch)
    model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                                     num_virtual_tokens=args.prompt_len,
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
    model.train()
    opt = bench.make_optimizer("torch", [q for q in model.parameters() if q.requires_grad], torch, 0.3)
    collate = DataCollatorForSeq2Seq(T5Tokenizer(vocab_file=args.vocab, legacy=False), model=None,
                                     padding="longest", return_tensors="pt")
    batches = json.loads(open(args.batches).read())["batches"]

    def step(features):
        # Pads input_ids (and attention_mask) and labels (with -100) to the longest.
        batch = collate(features)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    times = []
    for i, features in enumerate(batches):
        t = time.perf_counter()
        step([{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]),
               "labels": f["labels"]} for f in features])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    with open(args.json, "w") as f:
        json.dump({"all_s": times, "versions": versions}, f)


if __name__ == "__main__":
    main()
