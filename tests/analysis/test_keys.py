from __future__ import annotations

import pytest
import torch

from keyscope._infra.errors import LayerOutOfRange, SubjectNotFound
from keyscope.analysis.keys import collect_keys, layer_keys
from keyscope.data.prompts import locate, pad_batch
from keyscope.model.models import down_projection, key_hook, load_model, value_hook
from tests import hf_tiny

LAYER = 1


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe": hf_tiny.byte_level_bpe_tokenizer(), "sp": hf_tiny.sentencepiece_style_tokenizer()}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {arch: load_model(str(path)) for arch, path in tiny_checkpoints.items()}


# ------------------------------------------------------------------------------------- BOS


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_model_tokenizes_as_trained_and_index_counts_the_bos(models, tiny_checkpoints, arch):
    """The bridge would prepend a BOS to every tokenizer; keyscope's models read text as their own tokenizer does:
    no BOS for the byte-level BPE of GPT-2 / GPT-NeoX / GPT-J, ``<s>`` for the LLaMA-style one."""
    from transformers import AutoTokenizer

    model = models[arch]
    own = AutoTokenizer.from_pretrained(str(tiny_checkpoints[arch]))
    enc, index = locate(model.tokenizer, "{} is located in", "The Eiffel Tower")
    assert list(enc.ids) == own(enc.text)["input_ids"]
    assert (enc.ids[0] == model.tokenizer.bos_token_id) == (arch in ("llama", "mistral"))
    assert enc.offsets[index][1] == len("The Eiffel Tower")


# ------------------------------------------------------------------------------------- collect_keys

PROMPTS = ["{} is located in the city of", "The capital of France is {}, they say", "{}", "I flew to {} last year"]
SUBJECTS = ["The Eiffel Tower", "Paris", "São Paulo", "Los Angeles"]


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_keys_match_run_with_cache_and_raw_pre_hook(models, arch):
    model = models[arch]
    keys = collect_keys(model, PROMPTS, SUBJECTS, LAYER)
    assert keys.shape == (len(PROMPTS), model.cfg.d_mlp) and keys.dtype == torch.float32

    captured: list[torch.Tensor] = []
    handle = down_projection(model, LAYER).register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        for row, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS)):
            enc, index = locate(model.tokenizer, prompt, subject)
            ids = torch.tensor([enc.ids])
            _, cache = model.run_with_cache(ids, names_filter=key_hook(LAYER))
            torch.testing.assert_close(keys[row], cache[key_hook(LAYER)][0, index], rtol=1e-5, atol=1e-5)
            captured.clear()
            with torch.no_grad():
                model(ids)
            torch.testing.assert_close(keys[row], captured[0][0, index], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_left_and_right_padding_give_the_same_keys(models, arch):
    model = models[arch]
    right = collect_keys(model, PROMPTS, SUBJECTS, LAYER, padding_side="right")
    left = collect_keys(model, PROMPTS, SUBJECTS, LAYER, padding_side="left")
    single = collect_keys(model, PROMPTS, SUBJECTS, LAYER, batch_size=1)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, right, rtol=1e-5, atol=1e-5)

    # the check has teeth: the batch really is padded, and left padding without the mask changes the keys
    seqs = [locate(model.tokenizer, p, s)[0].ids for p, s in zip(PROMPTS, SUBJECTS)]
    ids, mask = pad_batch(seqs, model.tokenizer.pad_token_id, "left")
    assert (mask == 0).any()
    naive = layer_keys(model, ids, None, LAYER)[:, -1]  # (batch, d_mlp) at each row's last real token
    masked = layer_keys(model, ids, mask, LAYER)[:, -1]
    short = [i for i, seq in enumerate(seqs) if len(seq) < ids.shape[1]]
    assert not torch.allclose(naive[short], masked[short], atol=1e-4)


def test_forward_stops_at_the_key(models):
    model = models["llama"]
    fired: list[str] = []
    later = [value_hook(LAYER), key_hook(LAYER + 1), f"blocks.{LAYER + 1}.hook_in"]
    for name in later:
        model.add_hook(name, lambda act, hook: fired.append(hook.name))
    try:
        ids, mask = pad_batch([locate(model.tokenizer, "{} is", "Paris")[0].ids], 0)
        keys = layer_keys(model, ids, mask, LAYER)
        assert keys.shape[-1] == model.cfg.d_mlp
        collect_keys(model, ["{} is"], ["Paris"], LAYER)
        assert fired == []
        with torch.no_grad():
            model(ids)
        assert len(fired) == len(later), "the hooks themselves work"
    finally:
        model.reset_hooks()


def test_last_layer_and_bad_layers(models):
    model = models["gpt2"]
    last = model.cfg.n_layers - 1
    keys = collect_keys(model, ["{} is"], ["Paris"], last)
    enc, index = locate(model.tokenizer, "{} is", "Paris")
    _, cache = model.run_with_cache(torch.tensor([enc.ids]), names_filter=key_hook(last))
    torch.testing.assert_close(keys[0], cache[key_hook(last)][0, index], rtol=1e-5, atol=1e-5)
    for bad in (-1, model.cfg.n_layers):
        with pytest.raises(LayerOutOfRange):
            collect_keys(model, ["{} is"], ["Paris"], bad)
    with pytest.raises(ValueError):
        collect_keys(model, ["{} is"], ["Paris", "Rome"], 0)
    with pytest.raises(SubjectNotFound):
        collect_keys(model, ["Rome is big"], ["Paris"], 0)
