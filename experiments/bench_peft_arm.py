"""The PEFT arm of bench_prompt_step.py (not run by itself): Hugging Face PEFT prompt tuning, timed per step.

Runs under a Python with torch, transformers and peft (`pip install -e '.[oracle]'`, README: CPU torch;
bench_prompt_step.py's --peft-python). The frozen model is transformers' T5ForConditionalGeneration with
the sizes of our T5Config
(--dims, a JSON of its fields), random weights (torch seed 0), gated GELU and an output layer of its own (the
T5 1.1 / LM-adapted checkpoints do not tie it to the embedding), dropout --dropout. PEFT wraps it in
PromptTuningConfig(SEQ_2_SEQ_LM, --prompt-len virtual tokens, random init). The optimizer is
torch.optim.Adafactor(lr 0.3, beta2_decay -0.8, weight decay 1e-5): the paper's Adafactor (PT gin: constant
lr 0.3, decay 0.8, weight decay 1e-5) as closely as torch has it; torch's also scales each update by the
parameter's RMS, which costs the same.
Batches: --batches FILE, a JSON {"batches": [[{"input_ids": [...], "labels": [...]}, ...], ...]} of unpadded
ids ending in EOS, collated as a PEFT user would (DataCollatorForSeq2Seq(padding="longest")); else --steps
random batches of --batch rows, --enc-len input ids and --dec-len target ids (the last one EOS).
Writes --json: {"all_s": [seconds of each timed step], "losses": [...], "versions": {...}}. The first
--warmup steps are not timed.
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # random weights: nothing to download


def peft_model(dims, dropout, prompt_len, torch):
    """PEFT prompt tuning around a random T5 1.1 of the given sizes (T5Config fields)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration
    sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
             "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")
    config = T5Config(**{k: dims[k] for k in sizes},
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=dropout,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
        # transformers 5 ties T5's output layer to the embedding whatever the config says; untie it so the
        # model has the 1.1 checkpoints' parameters (and their cost).
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    tuning = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt_len,
                                prompt_tuning_init=PromptTuningInit.RANDOM)
    return get_peft_model(model, tuning)


def random_batches(n, batch, enc_len, dec_len, vocab_size, torch):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        labels = torch.randint(2, vocab_size, (batch, dec_len), generator=g)
        labels[:, -1] = 1
        yield {"input_ids": torch.randint(2, vocab_size, (batch, enc_len), generator=g),
               "attention_mask": torch.ones(batch, enc_len, dtype=torch.long), "labels": labels}


def file_batches(path, vocab):
    """The batches of a --batches file, each padded to its longest row (PEFT's usual collator)."""
    from transformers import DataCollatorForSeq2Seq, T5Tokenizer
    collate = DataCollatorForSeq2Seq(T5Tokenizer(vocab_file=vocab, legacy=False), padding="longest",
                                     return_tensors="pt")
    for rows in json.loads(open(path).read())["batches"]:
        yield collate([{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                        "labels": r["labels"]} for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", required=True, help="JSON of T5Config's fields (bench_prompt_step passes them)")
    p.add_argument("--batches", help="JSON file of token-id batches (else random batches)")
    p.add_argument("--vocab", help="spiece.model, with --batches (the collator pads with its pad id, 0)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--enc-len", type=int, default=128)
    p.add_argument("--dec-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed random batches")
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import peft
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    dims = json.loads(args.dims)
    model = peft_model(dims, args.dropout, args.prompt_len, torch)
    model.train()
    opt = torch.optim.Adafactor([q for q in model.parameters() if q.requires_grad], lr=0.3,
                                beta2_decay=-0.8, weight_decay=1e-5)
    if args.batches:
        batches = file_batches(args.batches, args.vocab)
    else:
        batches = random_batches(args.warmup + args.steps, args.batch, args.enc_len, args.dec_len,
                                 dims["vocab_size"], torch)
    times, losses = [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    with open(args.json, "w") as f:
        json.dump({"all_s": times, "losses": losses, "versions": versions}, f)


if __name__ == "__main__":
    main()
