"""t5_model.py against the Hugging Face oracle (tiny random checkpoints written the way the hub has them),
known answers (relative-position buckets, parameter counts) and properties (causality, padding, dropout)."""
import dataclasses
import fnmatch
import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5_model as tm
from conftest import EPS32, ORACLE_INSTALL, f32_atol, network_roundings

torch = pytest.importorskip("torch", reason=ORACLE_INSTALL)
transformers = pytest.importorskip("transformers", reason=ORACLE_INSTALL)
from safetensors.torch import save_file  # noqa: E402  (installed with transformers)

TINY_HF = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
B, S, T, P = 3, 150, 6, 5  # S > relative_attention_max_distance = 128


def _write_hub_checkpoint(model, d, untied):
    """model.safetensors + config.json as on the hub. For T5 1.1: tie_word_embeddings false and a distinct
    lm_head.weight (transformers 5.x would save an in-memory untied T5 tied, without d_model^-0.5 scaling)."""
    d.mkdir(parents=True, exist_ok=True)
    if not untied:
        model.save_pretrained(d)
        return
    sd = {k: v.detach().clone().contiguous()
          for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("scale_decoder_outputs", None)
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))


def _batch(dec_len=T):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, TINY_HF["vocab_size"], (B, S))
    ids[1, 100:] = 0  # padded rows
    ids[2, 9:] = 0
    dec = rng.integers(2, TINY_HF["vocab_size"], (B, dec_len))
    dec[:, 0] = 0
    prompt = rng.normal(size=(P, TINY_HF["d_model"])).astype(np.float32)
    return ids, dec, prompt


def _hf_generate(hf, ids, max_len):
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0).long(),
                      do_sample=False, max_new_tokens=max_len, num_beams=1).numpy()
    out = out[:, 1:]  # drop the decoder start token
    return np.pad(out, ((0, 0), (0, max_len - out.shape[1])))  # HF stops early once every row has hit EOS


@pytest.fixture(scope="module")
def tiny():
    cfg = tm.T5Config.tiny(vocab_size=64)
    return cfg, tm.init_params(jax.random.key(0), cfg)


_CHECKPOINTS = {}


@pytest.fixture(scope="module", params=["t5_1_1", "t5_1_0"])
def ckpt(request, tmp_path_factory):
    """(directory, HF model read back from it), for each architecture."""
    return _checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def lm_adapt_ckpt(tmp_path_factory):
    """The T5 1.1 / LM-adapted checkpoint only."""
    return _checkpoint("t5_1_1", tmp_path_factory)


def _checkpoint(kind, tmp_path_factory):
    """Row EOS=1 of the output layer becomes a slightly larger copy of the row of a token that greedy decoding
    emits in the last row only, so the decoding test sees that row stop at EOS while the others go on."""
    if kind in _CHECKPOINTS:
        return _CHECKPOINTS[kind]
    untied = kind == "t5_1_1"
    torch.manual_seed(0)
    cfg = transformers.T5Config(**TINY_HF, feed_forward_proj="gated-gelu" if untied else "relu",
                                tie_word_embeddings=not untied)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        if untied:
            lm_head = torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5
            model.lm_head.weight = torch.nn.Parameter(lm_head)
        else:  # at HF's init the std-1 embedding dominates the residual stream: every row repeats one token
            model.shared.weight.mul_(0.1)
        head = model.lm_head.weight if untied else model.shared.weight
        tokens = _hf_generate(model, _batch()[0], 8)
        head[1] = head[next(t for t in tokens[-1] if t not in tokens[0])] * 1.05
    d = tmp_path_factory.mktemp(kind)
    _write_hub_checkpoint(model, d, untied)
    _CHECKPOINTS[kind] = d, transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    return _CHECKPOINTS[kind]


def test_checkpoint_written_like_the_hub(ckpt):
    d, hf = ckpt
    tensors = tm._read_safetensors(d / "model.safetensors")
    config = json.loads((d / "config.json").read_text())
    if config["tie_word_embeddings"]:
        assert "lm_head.weight" not in tensors and hf.config.scale_decoder_outputs
    else:
        assert not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])
        assert not hf.config.scale_decoder_outputs
        assert not torch.equal(hf.lm_head.weight, hf.shared.weight)


@pytest.mark.parametrize("dec_len", [T, 4 * T], ids=["short_targets", "long_targets"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no_prompt", "prompt"])
def test_logits_match_hf(ckpt, with_prompt, dec_len):
    """Without a prompt: HF on input_ids. With one: HF on inputs_embeds = [prompt; embed(ids)] and P more
    mask ones (Lester et al. 2021 §2), which is what t5_model.forward(prompt=...) must compute. Short targets
    take the cross-attention that never forms keys and values (_attend_encoded), long ones the projected
    keys and values."""
    d, hf = ckpt
    cfg, params = tm.load_checkpoint(d)
    ids, dec, prompt = _batch(dec_len)
    assert tm._absorbs_cross(cfg, S + (P if with_prompt else 0), dec_len) == (dec_len == T)
    input_ids, mask, dec_ids = torch.tensor(ids), torch.tensor(ids != 0).long(), torch.tensor(dec)
    with torch.no_grad():
        if with_prompt:
            embeds = torch.cat([torch.tensor(prompt).expand(B, -1, -1), hf.shared(input_ids)], dim=1)
            mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], dim=1)
            ref = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_ids).logits.numpy()
        else:
            ref = hf(input_ids=input_ids, attention_mask=mask, decoder_input_ids=dec_ids).logits.numpy()
    ours = tm.forward(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32),
                      prompt=jnp.asarray(prompt) if with_prompt else None)
    assert ours.dtype == jnp.float32 and ours.shape == (B, dec_len, cfg.vocab_size)
    print(f"{d.name}{' with prompt' if with_prompt else ''}: max |logit diff| = "
          f"{np.abs(np.asarray(ours) - ref).max():.2e} (max |logit| {np.abs(ref).max():.1f})")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=f32_atol(ref, network_roundings(cfg, S + P)))


@pytest.mark.parametrize("max_len", [8, 24])
def test_greedy_decode_matches_hf_generate(ckpt, max_len):
    """max_len 8: cross-attention without keys/values (_attend_encoded); 24: with projected, cached ones."""
    d, hf = ckpt
    cfg, params = tm.load_checkpoint(d)
    ids, _, _ = _batch()
    assert tm._absorbs_cross(cfg, S, max_len) == (max_len == 8)
    ref = _hf_generate(hf, ids, max_len)
    ours = np.asarray(tm.greedy_decode(params, cfg, jnp.asarray(ids, jnp.int32), max_len=max_len))
    assert ours.dtype == np.int32
    print(f"{d.name} greedy tokens:\n{ours}")
    np.testing.assert_array_equal(ours, ref)
    if max_len != 8:
        return
    eos_at = list(ours[-1]).index(tm.EOS_ID)  # the fixture made the last row stop early, padded after EOS ...
    assert eos_at < 7 and (ours[-1, eos_at + 1:] == tm.PAD_ID).all()
    assert (ours[0] > tm.EOS_ID).all()  # ... while the first row runs to max_len


def test_score_targets_is_hf_log_likelihood(lm_adapt_ckpt):
    d, hf = lm_adapt_ckpt
    cfg, params = tm.load_checkpoint(d)
    ids, dec, _ = _batch()
    targets = dec[:, 1:].copy()
    targets[0, 3:] = 0  # pad after the first 3 tokens
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0).long(),
                    decoder_input_ids=torch.tensor(np.asarray(tm.shift_right(jnp.asarray(targets))))).logits
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    ref = (logp * (targets != 0)).sum(-1)
    ours = tm.score_targets(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(targets, jnp.int32))
    # T log-probabilities summed, each a log-sum-exp over V on top of the network
    n = network_roundings(cfg, S) + cfg.vocab_size + targets.shape[1]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=f32_atol(ref, n))


def test_sharded_safetensors_and_pytorch_bin_load_the_same_params(ckpt, tmp_path):
    d, hf = ckpt
    _, params = tm.load_checkpoint(d)
    tensors = tm._read_safetensors(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f, keys in shards.items():
        save_file({k: torch.tensor(np.array(tensors[k])) for k in keys}, str(sharded / f))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    binary = tmp_path / "bin"
    binary.mkdir()
    # The full state dict, as older hub repos store it: tied models repeat the embedding as
    # encoder/decoder.embed_tokens (and lm_head); these duplicates must be accepted.
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    for other in (sharded, binary):
        shutil.copy(d / "config.json", other / "config.json")
        _, loaded = tm.load_checkpoint(other)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_pytorch_bin_without_torch_says_what_to_install(ckpt, tmp_path, monkeypatch):
    d, hf = ckpt
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    shutil.copy(d / "config.json", tmp_path / "config.json")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        tm.load_checkpoint(tmp_path)


def test_t5_1_1_saved_by_transformers_5_loads(lm_adapt_ckpt, tmp_path):
    """transformers 5.x save_pretrained writes tie_word_embeddings=true for every T5 and marks T5 1.1 (no
    d_model^-0.5 rescaling) with scale_decoder_outputs=false: a hub T5 1.1 saved again keeps its
    lm_head.weight; one built in memory has its head tied to the embedding and no lm_head.weight in the file.
    Both must load as HF runs them."""
    d, hf = lm_adapt_ckpt
    cfg, params = tm.load_checkpoint(d)
    hf.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["scale_decoder_outputs"] is False
    cfg2, params2 = tm.load_checkpoint(tmp_path / "resaved")
    assert cfg2 == dataclasses.replace(cfg, name=cfg2.name)
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    torch.manual_seed(1)
    gated = transformers.T5Config(**TINY_HF, feed_forward_proj="gated-gelu")
    mem = transformers.T5ForConditionalGeneration(gated)
    mem.eval().save_pretrained(tmp_path / "in_memory")
    assert "lm_head.weight" not in tm._read_safetensors(tmp_path / "in_memory" / "model.safetensors")
    cfg, params = tm.load_checkpoint(tmp_path / "in_memory")
    ids, dec, _ = _batch()
    with torch.no_grad():
        ref = mem(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0).long(),
                  decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = tm.forward(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=f32_atol(ref, network_roundings(cfg, S)))


def test_pre_zip_pytorch_bin_loads(lm_adapt_ckpt, tmp_path):
    """pytorch_model.bin from torch < 1.6 (no zip container) cannot be memory-mapped; it must still load."""
    d, hf = lm_adapt_ckpt
    _, params = tm.load_checkpoint(d)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    shutil.copy(d / "config.json", tmp_path / "config.json")
    jax.tree.map(np.testing.assert_array_equal, tm.load_checkpoint(tmp_path)[1], params)


def test_unused_cross_attention_relpos_table_is_ignored(tmp_path_factory, tmp_path):
    """Early HF conversions of T5 1.0 hold a relpos table for the first cross-attention, which T5 never
    uses; transformers skips it on load too: https://github.com/huggingface/transformers/issues/2334"""
    d, _ = _checkpoint("t5_1_0", tmp_path_factory)
    _, params = tm.load_checkpoint(d)
    tensors = {k: torch.tensor(np.array(v)) for k, v in tm._read_safetensors(d / "model.safetensors").items()}
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(32, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    jax.tree.map(np.testing.assert_array_equal, tm.load_checkpoint(tmp_path)[1], params)


def test_hub_download_fetches_one_copy_of_the_weights(lm_adapt_ckpt, tmp_path, monkeypatch):
    """Hub T5 repos often hold model.safetensors, pytorch_model.bin, TF and Flax copies of the same weights:
    download the safetensors only, and the .bin only when there are none."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    d, hf = lm_adapt_ckpt
    repo, fetched = tmp_path / "repo", []
    repo.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, repo / f)
    torch.save(hf.state_dict(), repo / "pytorch_model.bin")
    (repo / "tf_model.h5").write_bytes(b"")

    # a stand-in for the hub: copies what the patterns ask for
    def snapshot_download(repo_id, allow_patterns):
        snapshot = tmp_path / "cache" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns) and not (snapshot / f.name).exists():
                shutil.copy(f, snapshot / f.name)
                fetched.append(f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    _, params = tm.load_checkpoint("google/tiny-t5")
    assert sorted(fetched) == ["config.json", "model.safetensors"]
    (repo / "model.safetensors").unlink()
    _, from_bin = tm.load_checkpoint("google/tiny-pt-only-t5")
    assert "pytorch_model.bin" in fetched and "tf_model.h5" not in fetched
    jax.tree.map(np.testing.assert_array_equal, from_bin, params)


def test_bfloat16_params_give_finite_logits_close_to_float32(lm_adapt_ckpt):
    d, _ = lm_adapt_ckpt
    ids, dec, prompt = _batch()
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(dec, jnp.int32), jnp.asarray(prompt))
    cfg, p32 = tm.load_checkpoint(d)
    _, p16 = tm.load_checkpoint(d, dtype=jnp.bfloat16)
    assert p16["encoder"]["layers"]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
    l32, l16 = tm.forward(p32, cfg, *args), tm.forward(p16, cfg, *args)
    assert l16.dtype == jnp.float32 and bool(jnp.isfinite(l16).all())
    print(f"{d.name}: bf16 vs fp32 max |logit diff| = {float(jnp.abs(l16 - l32).max()):.3f}, "
          f"max |logit| {float(jnp.abs(l32).max()):.1f}")
    assert float(jnp.abs(l16 - l32).max()) < 0.05 * float(jnp.abs(l32).max())
    assert float(jnp.mean(jnp.argmax(l16, -1) == jnp.argmax(l32, -1))) > 0.8


# --------------------------------------------------------------------------------------------- bad input
def _copy_without(src, dst, drop=None, reshape=None):
    tensors = tm._read_safetensors(src / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items() if k != drop}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    dst.mkdir()
    save_file({k: torch.tensor(v) for k, v in tensors.items()}, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_missing_and_misshaped_tensors_are_named(ckpt, tmp_path):
    d, _ = ckpt
    name = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        tm.load_checkpoint(_copy_without(d, tmp_path / "missing", drop=name))
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(31, 32\), expected \(32, 32\)"):
        tm.load_checkpoint(_copy_without(d, tmp_path / "shape", reshape=name))


def test_non_finite_weights_are_refused_naming_the_tensor(lm_adapt_ckpt, tmp_path):
    """A checkpoint with a NaN or inf weight scored 50.0 (rank) or 0.0 (decode) and exited 0; now loading it
    fails in one line naming the checkpoint and the tensor."""
    d, _ = lm_adapt_ckpt
    tensors = {k: np.array(v) for k, v in tm._read_safetensors(d / "model.safetensors").items()}
    for bad, value in [("nan", np.nan), ("inf", -np.inf)]:
        damaged = {**tensors, "encoder.block.1.layer.1.DenseReluDense.wo.weight":
                   tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"].copy()}
        damaged["encoder.block.1.layer.1.DenseReluDense.wo.weight"][3, 5] = value
        (tmp_path / bad).mkdir()
        save_file({k: torch.tensor(v) for k, v in damaged.items()}, str(tmp_path / bad / "model.safetensors"))
        shutil.copy(d / "config.json", tmp_path / bad / "config.json")
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / bad))}: weight "
                                             r"encoder/layers_1/mlp/wo/kernel holds NaN or inf \(1 of 2048"):
            tm.load_checkpoint(tmp_path / bad)
    tm.check_finite_weights(tm.load_checkpoint(d)[1], d)   # a sound checkpoint passes


def test_wrong_and_broken_files_say_what_to_do(lm_adapt_ckpt, tmp_path):
    d, _ = lm_adapt_ckpt
    parent = re.escape(f"({d})")
    with pytest.raises(NotADirectoryError, match=f"is a file: pass the checkpoint directory .*{parent}"):
        tm.load_checkpoint(d / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(d / "config.json", broken / "config.json")
    weights = (d / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="not a complete safetensors file .*: download it again"):
        tm.load_checkpoint(broken)
    # `git clone` without git-lfs leaves a short text file (read as a header size, it asked for exabytes)
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"
    (broken / "model.safetensors").write_text(pointer)
    with pytest.raises(ValueError, match="is a Git LFS pointer, not the weights: run `git lfs pull`"):
        tm.load_checkpoint(broken)
    (broken / "model.safetensors").unlink()
    index = {"weight_map": {"shared.weight": "model-1.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError,
                       match="names model-1.safetensors, which is not in .*the missing shard"):
        tm.load_checkpoint(broken)
    (broken / "config.json").write_text(json.dumps(transformers.BartConfig(d_model=16).to_dict()))
    with pytest.raises(ValueError, match="model_type='bart'.*not a T5 config"):
        tm.load_checkpoint(broken)


def _safetensors(path, header, data=bytes(8), length=None):
    """A .safetensors file by hand: u64 little-endian header length, the JSON header, the data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(int(len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, length, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10, "not a complete"),   # header length
    ({}, 2 ** 64 - 1, r"header length 18446744073709551615"),
    (b"{not json}", None, "JSONDecodeError"),
    ([1, 2], None, "TypeError"),
    ({"a": 5}, None, "TypeError"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, None, "KeyError: 'dtype'"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, None, "KeyError: 'shape'"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, None, "TypeError"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, None, r"tensor 'a' .*'shape': \[-1\]"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, None, "tensor 'a' .*'shape': '2'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, r"\[-8, 0\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, None, r"\[8, 4\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, None, "too many values to unpack"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8.0]}}, None, "TypeError"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, "within the 8 bytes of data"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, r"'shape': \[3\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 5]}}, None, r"\[0, 5\]"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, None, "'C64'.* is not F32, F16 or BF16"),
])
def test_malformed_safetensors_headers_get_one_line_naming_the_file(tmp_path, header, length, match):
    """Damaged or hostile safetensors files: a one-line ValueError naming the file, never a KeyError,
    AttributeError or numpy reshape error that names no file, nor bytes viewed as another shape."""
    path = _safetensors(tmp_path / "model.safetensors", header, length=length)
    with pytest.raises(ValueError, match=match) as e:
        tm._read_safetensors(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), e.value
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}
    np.testing.assert_array_equal(tm._read_safetensors(_safetensors(tmp_path / "ok.safetensors", ok))["a"],
                                  np.zeros(2, np.float32))


def test_t5x_checkpoint_is_recognised(shared_data):
    """The official SPoT code reads T5X checkpoints; ours reads HF ones and must say so, naming the model."""
    for path in (shared_data / "t5x_tiny_checkpoint", shared_data / "t5x_tiny_checkpoint" / "checkpoint_3"):
        with pytest.raises(FileNotFoundError, match="is a T5X checkpoint .*google/t5-base-lm-adapt"):
            tm.load_checkpoint(path)


def test_nonexistent_path_and_unknown_names_raise():
    with pytest.raises(FileNotFoundError, match="/no/such/checkpoint does not exist"):
        tm.load_checkpoint("/no/such/checkpoint")
    with pytest.raises(ValueError, match="unknown T5 name 't5-huge'.*google/t5-base-lm-adapt"):
        tm.T5Config.from_name("t5-huge")


def test_prepend_prompt_known_answer():
    """Lester et al. 2021 §2: every example reads [P_e; X_e]; prompt positions are never masked."""
    prompt = jnp.arange(6.0).reshape(3, 2)                          # [P=3, D=2]
    x = -jnp.arange(16.0, dtype=jnp.bfloat16).reshape(2, 4, 2)      # [B=2, S=4, D]
    mask = jnp.array([[True, True, False, False], [True, True, True, True]])
    out, out_mask = tm.prepend_prompt(prompt, x, mask)
    assert out.shape == (2, 7, 2) and out.dtype == jnp.bfloat16      # the prompt takes the activations' dtype
    for b in range(2):
        np.testing.assert_array_equal(out[b, :3], prompt)
        np.testing.assert_array_equal(out[b, 3:], x[b])
    np.testing.assert_array_equal(out_mask, [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])


def test_encode_reads_the_prompt_as_embedded_tokens(tiny):
    """A prompt made of token embeddings encodes exactly as those tokens in front of the input."""
    cfg, params = tiny
    ids = jnp.array([[5, 6, 7, 1, 0], [8, 1, 0, 0, 0]], jnp.int32)
    prefix = jnp.array([11, 12, 13], jnp.int32)
    prompt = params["token_embedder"]["embedding"][prefix]
    with_prompt, mask = tm.encode(params, cfg, ids, prompt)
    as_tokens, _ = tm.encode(params, cfg, jnp.concatenate([jnp.broadcast_to(prefix, (2, 3)), ids], axis=1))
    np.testing.assert_array_equal(mask[:, :3], True)
    np.testing.assert_allclose(with_prompt, as_tokens, rtol=0,
                               atol=f32_atol(as_tokens, network_roundings(cfg, ids.shape[1] + 3)))


# --------------------------------------------------------------------------------------------- known answers
def test_relpos_bucket_known_answers():
    # Bidirectional, 32 buckets, max distance 128: 16 buckets per sign, exact below 8,
    # then 8 + floor(2 * log2(d / 8)) up to 15; positive offsets (keys after the query) add 16.
    rel = [0, -1, 1, -7, 7, -8, 8, -11, -12, -16, 16, -32, -64, -90, -91, -128, 200, -200]
    want = [0, 1, 17, 7, 23, 8, 24, 8, 9, 10, 26, 12, 14, 14, 15, 15, 31, 15]
    np.testing.assert_array_equal(tm.relpos_bucket(np.array(rel), True), want)
    # Causal: only keys before the query; exact below 16, then 16 + floor(16/3 * log2(d / 16)) up to 31.
    rel = [5, 0, -3, -15, -16, -20, -32, -64, -100, -127, -128, -200]
    want = [0, 0, 3, 15, 16, 17, 21, 26, 30, 31, 31, 31]
    np.testing.assert_array_equal(tm.relpos_bucket(np.array(rel), False), want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 64)])
def test_relpos_bucket_matches_hf(bidirectional, buckets, max_distance):
    rel = np.arange(-1000, 1001)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional, buckets, max_distance).numpy()
    np.testing.assert_array_equal(tm.relpos_bucket(rel, bidirectional, buckets, max_distance), ref)


# Each lm-adapt shape equals its v1_1 shape, so the ten shapes are checked through these ten names.
@pytest.mark.parametrize("name", [n for n in tm.KNOWN_NAMES if "v1_1" not in n])
def test_param_count_matches_hf_meta_model(name):
    cfg = tm.T5Config.from_name(name)
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        feed_forward_proj="gated-gelu" if cfg.gated_gelu else "relu",
        tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_cfg)
        # transformers 5.x ties in memory; the hub's T5 1.1 checkpoints are untied
        if not cfg.tie_word_embeddings:
            hf.lm_head.weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
    assert tm.param_count(cfg) == sum(p.numel() for p in hf.parameters())


def test_presets():
    # T5 1.1 Base with its own output layer: 247.6M, as HF's T5ForConditionalGeneration counts it
    assert tm.param_count(tm.T5Config.from_name("google/t5-base-lm-adapt")) == 247_577_856
    for size in ("small", "base", "large", "xl", "xxl"):
        lm = tm.T5Config.from_name(f"google/t5-{size}-lm-adapt")
        v11 = tm.T5Config.from_name(f"google/t5-v1_1-{size}")
        assert lm.gated_gelu and not lm.tie_word_embeddings and lm == dataclasses.replace(v11, name=lm.name)
    base = tm.T5Config.from_name("google-t5/t5-base")
    assert (base.d_ff, base.gated_gelu, base.tie_word_embeddings) == (3072, False, True)
    assert tm.T5Config.from_name("t5-11b").num_heads == 128
    tiny = tm.T5Config.tiny()
    shape = (tiny.d_model, tiny.num_layers, tiny.num_heads, tiny.d_kv, tiny.d_ff, tiny.vocab_size)
    assert shape == (16, 2, 2, 8, 32, 32128)


def test_from_hf_reads_a_hub_config():
    c = transformers.T5Config(vocab_size=32100, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_dict()
    # transformers 5.x writes tie_word_embeddings=true for every T5; scale_decoder_outputs=false marks T5 1.1
    assert c["tie_word_embeddings"] and c["scale_decoder_outputs"] is False
    cfg = tm.T5Config.from_hf(c)
    base = tm.T5Config.from_name("google/t5-base-lm-adapt")
    assert cfg == dataclasses.replace(base, vocab_size=32100, name=cfg.name)
    # as transformers 4.x and the hub write it
    hub = {**{k: v for k, v in c.items() if k != "scale_decoder_outputs"}, "tie_word_embeddings": False}
    assert tm.T5Config.from_hf(hub) == cfg
    assert tm.T5Config.from_hf({**c, "scale_decoder_outputs": True}).tie_word_embeddings
    with pytest.raises(ValueError, match="no d_kv, no num_heads: it is not a T5 config"):
        tm.T5Config.from_hf({k: v for k, v in hub.items() if k not in ("d_kv", "num_heads")})


HUB_BASE = {"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048,
            "num_heads": 12, "num_layers": 12, "num_decoder_layers": None,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "dropout_rate": 0.1,
            "layer_norm_epsilon": 1e-6, "_name_or_path": "google/t5-base-lm-adapt"}


@pytest.mark.parametrize("change,match", [
    (dict(model_type="bart"), "model_type='bart'"), (dict(d_model=None), "no d_model"),
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu', not relu or gated-gelu")])
def test_from_hf_refuses_a_config_it_cannot_run_naming_the_file(change, match):
    """Another model, a size missing (None: the field removed) or a feed-forward we do not implement (it would
    run as another one without a word): a one-line ValueError naming the file."""
    base = tm.T5Config.from_name("google/t5-base-lm-adapt")
    assert tm.T5Config.from_hf(HUB_BASE) == base
    assert tm.T5Config.from_hf({k: v for k, v in HUB_BASE.items() if k != "model_type"}) == base  # optional
    c = {k: v for k, v in {**HUB_BASE, **change}.items() if k not in change or v is not None}
    with pytest.raises(ValueError, match=rf"^ckpt/config.json: {match}.*not a T5 config") as e:
        tm.T5Config.from_hf(c, where="ckpt/config.json")
    assert "\n" not in str(e.value)


def test_load_checkpoint_names_a_bad_config_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HUB_BASE, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: feed_forward_proj"):
        tm.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        tm.load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------- properties
def test_decoder_is_causal(tiny):
    cfg, params = tiny
    ids = jnp.array([[5, 6, 7, 1, 0, 0]], jnp.int32)
    dec = jnp.array([[0, 9, 10, 11]], jnp.int32)
    logits = tm.forward(params, cfg, ids, dec)
    later = tm.forward(params, cfg, ids, dec.at[0, 3].set(40))
    np.testing.assert_allclose(later[:, :3], logits[:, :3], rtol=0,
                               atol=f32_atol(logits, network_roundings(cfg, 6)))
    assert not np.allclose(later[:, 3], logits[:, 3])


def test_dropout_is_a_pure_function_of_the_key(tiny):
    cfg, params = tiny
    ids, dec = jnp.array([[5, 6, 7, 1, 0, 0]], jnp.int32), jnp.array([[0, 9, 10, 11]], jnp.int32)
    a = tm.forward(params, cfg, ids, dec, None, jax.random.key(1))
    b = tm.forward(params, cfg, ids, dec, None, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, tm.forward(params, cfg, ids, dec, None, jax.random.key(2)))
    assert not np.allclose(a, tm.forward(params, cfg, ids, dec))
    x = jnp.ones((40, 3, 5000))                             # [B, L, D]
    seeds = jax.random.bits(jax.random.key(7), (40,), jnp.uint32)  # one per example (_dropout_seeds)
    y = tm._dropout(x, "site", seeds, 0.1)
    # T5: one mask per (batch, feature), drawn anew for each example
    np.testing.assert_array_equal(y, jnp.broadcast_to(y[:, :1], y.shape))
    assert not np.array_equal(y[0, 0], y[1, 0])
    assert abs(float(jnp.mean(y == 0)) - 0.1) < 0.005  # 200k draws: 5 standard deviations
    np.testing.assert_allclose(jnp.unique(y), [0.0, 1 / 0.9], rtol=EPS32)  # inverted dropout keeps the mean
    other = tm._dropout(x, "another site", seeds, 0.1)
    assert abs(float(jnp.mean((y == 0) & (other == 0))) - 0.01) < 0.002  # sites draw independent masks
    per_element = tm._dropout(x, "site", seeds, 0.1, mask_shape=x.shape)
    assert abs(float(jnp.mean(per_element == 0)) - 0.1) < 0.005
    assert not np.array_equal(per_element[:, 0], per_element[:, 1])
    # A longer last axis (a batch padded to a longer bucket: runs sharing a step) keeps every other mask bit.
    probs = jnp.ones((40, 2, 3, 7))                          # [B, N, T, S], masks shared along T
    wider = tm._dropout(jnp.ones((40, 2, 3, 12)), "probs", seeds, 0.1, mask_shape=(40, 2, 1, 12))
    np.testing.assert_array_equal(tm._dropout(probs, "probs", seeds, 0.1, mask_shape=(40, 2, 1, 7)),
                                  wider[..., :7])
    # An example's masks depend on its own key only, not on its batch (train_step's sub-batches rely on it).
    keys = jax.random.split(jax.random.key(3), 2)
    ids2, dec2 = jnp.concatenate([ids, ids + 2]), jnp.concatenate([dec, dec])
    both = tm.forward(params, cfg, ids2, dec2, None, keys)
    np.testing.assert_allclose(tm.forward(params, cfg, ids2[1:], dec2[1:], None, keys[1:]), both[1:], rtol=0,
                               atol=f32_atol(both, network_roundings(cfg, 6)))
    # one key = the same key split per example
    np.testing.assert_array_equal(tm.forward(params, cfg, ids2, dec2, None, jax.random.key(3)), both)


# ----------------------------------------------------------------------------- layers under scan, remat, bf16
def test_scanned_and_unrolled_layers_and_remat_compute_the_same(tiny):
    """lax.scan over the stacked layers, the unrolled loop and every remat policy are one computation: the
    same logits, greedy tokens and prompt gradient (with dropout on), to float32 rounding."""
    cfg, params = tiny
    ids, dec, prompt = jnp.array(_batch()[0][:, :20] % 64), jnp.array(_batch()[1] % 64), jnp.ones((5, 16))
    key, n = jax.random.key(4), network_roundings(cfg, P + 20)

    def loss(prompt, cfg):
        return jnp.sum(tm.forward(params, cfg, ids, dec, prompt, key) ** 2)
    ref_logits = tm.forward(params, cfg, ids, dec, prompt, key)
    ref_grad = jax.grad(loss)(prompt, cfg)
    ref_tokens = tm.greedy_decode(params, cfg, ids, prompt, max_len=6)
    for variant in [dict(scan_layers=False), *(dict(remat=r) for r in ("layer", "dots"))]:
        other = dataclasses.replace(cfg, **variant)
        np.testing.assert_allclose(tm.forward(params, other, ids, dec, prompt, key), ref_logits, rtol=0,
                                   atol=f32_atol(ref_logits, n), err_msg=str(variant))
        np.testing.assert_allclose(jax.grad(loss)(prompt, other), ref_grad, rtol=0,
                                   atol=f32_atol(ref_grad, n), err_msg=str(variant))
        np.testing.assert_array_equal(tm.greedy_decode(params, other, ids, prompt, max_len=6), ref_tokens)
    assert float(jnp.abs(ref_grad).max()) > 0


def test_layers_are_stacked_and_each_layer_draws_its_own_dropout(tiny):
    cfg, params = tiny
    assert params["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 16, 2, 8)
    x, seeds = jnp.ones((3, 4, 16)), jnp.arange(3, dtype=jnp.uint32)

    def layer(x, p, seed):  # identity layers that return their dropout mask
        return x, tm._dropout(x, "site", seed, 0.5)
    _, masks = tm._scan_layers(layer, x, jnp.zeros((2, 1)), cfg, seeds)
    assert masks.shape == (2, 3, 4, 16) and not np.array_equal(masks[0], masks[1])


def _dot_operand_dtypes(text):
    """The element types of (lhs, rhs) of every dot_general in a StableHLO module's text."""
    element = r"tensor<[^>]*?x([bf]f?\d+)>"   # tensor<4x8x32128xf32> -> f32
    return re.findall(rf"stablehlo\.dot_general [^\n]*?: \({element}, {element}\)", text)


@pytest.mark.parametrize("remat", ["none", "layer"])
def test_bfloat16_weights_multiply_in_bfloat16_and_norms_softmax_loss_stay_float32(remat):
    """--dtype bfloat16: every matmul of the training step, forward and backward, takes bfloat16 operands in
    the lowered program (before any backend upcasts); exp (softmax, loss), log and rsqrt (norms) run in
    float32. In float32 the same count finds only float32 operands."""
    import spot
    cfg = dataclasses.replace(tm.T5Config.tiny(), remat=remat)
    tc = spot.TrainConfig(batch_size=4)
    prompt = jax.ShapeDtypeStruct((5, cfg.d_model), jnp.float32)
    state = (prompt, jax.eval_shape(spot.make_optimizer(tc.optimizer).init, prompt))
    batch = {"inputs": jax.ShapeDtypeStruct((4, 12), jnp.int32),
             "targets": jax.ShapeDtypeStruct((4, 8), jnp.int32)}
    for dtype, want in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
        frozen = jax.eval_shape(lambda k: tm.init_params(k, cfg, dtype), jax.random.key(0))
        text = spot.train_step.lower(*state, frozen, batch, spot.dropout_key(0, 0), cfg, tc.optimizer,
                                     tc.z_loss, 1, 2).as_text()
        dots = _dot_operand_dtypes(text)
        assert len(dots) >= 4 * (cfg.num_layers + cfg.num_decoder_layers), len(dots)
        assert set(dots) == {(want, want)}, (dtype, sorted(set(dots)))
        for op in ("exponential", "log", "rsqrt"):
            types = set(re.findall(rf"stablehlo\.{op} [^\n]*?: tensor<[^>]*?x([bf]f?\d+)>", text))
            assert types == {"f32"}, (op, dtype, types)
