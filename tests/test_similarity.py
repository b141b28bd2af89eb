from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from keyscope import similarity as sim
from keyscope.covariance import KeyCovariance
from keyscope.keys import fill, locate, subject_last_index
from keyscope.models import load_model
from tests import hf_tiny

LAYER = 1


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": hf_tiny.byte_level_bpe_tokenizer(),
        "sp": hf_tiny.sentencepiece_style_tokenizer(),
        "word": hf_tiny.word_level_tokenizer(),
    }


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    d = 48
    mixing = torch.eye(d) + 0.3 * torch.randn(d, d) / d**0.5  # well conditioned: the ridge is negligible
    keys = torch.randn(4000, d) @ mixing + 0.2  # correlated, non-centred
    return KeyCovariance(0, progress=False).partial_fit(keys)


# ------------------------------------------------------------------------------------- similarity maths


def test_whitened_similarity_equals_dense_numpy_formula(fitted):
    torch.manual_seed(3)
    C = fitted.C_.numpy()
    C_inv = np.linalg.inv(C)
    k1, k2 = torch.randn(48), torch.randn(48)
    expected = k1.double().numpy() @ C_inv @ k2.double().numpy()
    got = sim.whitened_similarity(k1, k2, fitted)
    assert got.dtype == torch.float64 and got.dim() == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-4)
    C_ridge_inv = np.linalg.inv(C + fitted.ridge_ * np.eye(48))  # exactly what is solved
    np.testing.assert_allclose(got.item(), k1.double().numpy() @ C_ridge_inv @ k2.double().numpy(), rtol=1e-9)

    A, B = torch.randn(5, 48), torch.randn(7, 48)
    M = sim.whitened_similarity_matrix(A, B, fitted)
    np.testing.assert_allclose(M.numpy(), A.double().numpy() @ C_inv @ B.double().numpy().T, rtol=1e-4, atol=1e-4)
    pairs = sim.whitened_similarity(A, B[:5], fitted)  # row-wise pairs
    np.testing.assert_allclose(pairs.numpy(), np.diag(M.numpy()[:, :5]), rtol=1e-10)
    sym = sim.whitened_similarity_matrix(A, None, fitted)
    np.testing.assert_allclose(sym.numpy(), sym.numpy().T, rtol=1e-10)
    np.testing.assert_allclose(sim.whitened_norm(A, fitted).numpy() ** 2, np.diag(sym.numpy()), rtol=1e-10)


def test_edit_strength(fitted):
    torch.manual_seed(4)
    C_inv = np.linalg.inv(fitted.C_.numpy())
    k_star, keys = torch.randn(48), torch.randn(6, 48)
    s = sim.edit_strength(keys, k_star, fitted)
    ks = k_star.double().numpy()
    expected = keys.double().numpy() @ C_inv @ ks / (ks @ C_inv @ ks)
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert sim.edit_strength(k_star, k_star, fitted).item() == pytest.approx(1.0, abs=1e-12)
    assert sim.edit_strength(3 * k_star.double(), k_star, fitted).item() == pytest.approx(3.0, abs=1e-12)
    S = sim.edit_strength_matrix(keys, keys[:4], fitted)
    assert S.shape == (6, 4)
    np.testing.assert_allclose(np.diag(S.numpy()[:4]), 1.0, rtol=1e-12)
    np.testing.assert_allclose(S[:, 2].numpy(), sim.edit_strength(keys, keys[2], fitted).numpy(), rtol=1e-10)


# ------------------------------------------------------------------------------------- perturbations

SHUFFLE_CASES = [
    ("{} is located in Paris", "The Eiffel Tower"),
    ("{} played basketball for the", "Michael Jordan"),
    ("The city of {} is big", "São Paulo"),
    ("Kobe Bryant played for the {}", "Los Angeles Lakers"),
]


@pytest.mark.parametrize("tok_name", ["bpe", "sp", "word"])
@pytest.mark.parametrize("template,subject", SHUFFLE_CASES)
def test_shuffles_decode_to_text_with_the_same_token_multiset(tokenizers, tok_name, template, subject):
    tok = tokenizers[tok_name]
    original = sim.subject_tokens(tok, template, subject)
    probes = sim.shuffled_subjects(tok, template, subject, n=10, seed=0)
    assert len(probes) <= 10
    assert len({p.prompt for p in probes}) == len(probes), "distinct permutations"
    for p in probes:
        assert p.kind == "shuffled" and p.exact_tokens is True
        assert "Ġ" not in p.prompt and "▁" not in p.prompt, "decoded text, not raw pieces"
        assert p.template.count("{}") == 1
        assert p.prompt != fill(template, subject).text
        assert sim.same_token_multiset(tok, p, template, subject)
        assert sim.subject_tokens(tok, p.template, p.subject) != original
        shuffled = sim.subject_tokens(tok, p.template, p.subject)
        assert Counter(shuffled) <= Counter(original)  # a bare-space token at the edge may fall outside
        # the subject's last token is the last shuffled token, at the same position as before
        assert subject_last_index(tok, p.template, p.subject) == subject_last_index(tok, template, subject)
    if len(set(original)) >= 3 and tok_name != "bpe":
        assert len(probes) >= 2


def test_shuffles_exist_for_the_tiny_tokenizers(tokenizers):
    counts = {name: len(sim.shuffled_subjects(tok, "{} played basketball for the", "Michael Jordan"))
              for name, tok in tokenizers.items()}
    assert counts["word"] == 1  # two words: one other order
    assert counts["bpe"] >= 3 and counts["sp"] >= 3


def test_byte_split_characters_cannot_always_be_shuffled(tokenizers):
    """Byte-level BPE splits ``ã`` into two byte tokens; most permutations separate them into invalid UTF-8,
    so the decoded text no longer re-tokenises into the shuffled tokens — those are flagged, and dropped
    by default."""
    tok = tokenizers["bpe"]
    every = sim.shuffled_subjects(tok, "The city of {} is big", "São Paulo", n=10, require_exact=False)
    assert any(p.exact_tokens is False for p in every)
    exact = sim.shuffled_subjects(tok, "The city of {} is big", "São Paulo", n=10)
    assert exact and all(p.exact_tokens for p in exact)
    assert not all(sim.same_token_multiset(tok, p, "The city of {} is big", "São Paulo") for p in every)


def test_single_token_subject_has_no_shuffle(tokenizers):
    assert sim.shuffled_subjects(tokenizers["word"], "{} is a country", "Slovenia") == []


@pytest.mark.parametrize("tok_name", ["bpe", "sp", "word"])
def test_long_context_has_exact_token_count(tokenizers, tok_name):
    tok = tokenizers[tok_name]
    context = iter(hf_tiny.TRAINING_TEXT * 3)
    probe = sim.long_context(tok, "{} is located in", "The Eiffel Tower", context, n_tokens=300)
    assert probe.kind == "long_context" and probe.n_context_tokens == 300
    head = probe.template[: probe.template.index("{}")]
    assert sim.count_prefix_tokens(tok, probe.prompt, len(head)) == 300
    assert probe.prompt.endswith("The Eiffel Tower is located in")
    # the prompt keeps its own tokens after the context, so the subject index moves by exactly 300
    short_enc, short_index = locate(tok, "{} is located in", "The Eiffel Tower", prepend_bos=False)
    long_index = subject_last_index(tok, probe.template, probe.subject, prepend_bos=False)
    assert long_index == short_index + 300
    # a second fact drawing from the same iterator gets different text
    other = sim.long_context(tok, "{} is located in", "The Eiffel Tower", context, n_tokens=300)
    assert other.template != probe.template


def test_rephrased_and_other_subjects():
    probes = sim.rephrased_subjects("{} is in Paris", "The Eiffel Tower", ["Eiffel Tower", "La tour Eiffel", ""])
    assert [p.prompt for p in probes] == ["Eiffel Tower is in Paris", "La tour Eiffel is in Paris"]
    assert all(p.kind == "rephrased" for p in probes)
    pool = ["Big Ben", "Colosseum", "The Eiffel Tower", "Big Ben", "Louvre"]
    others = sim.other_subjects("The Eiffel Tower is in Paris", "The Eiffel Tower", pool, n=2, seed=1)
    assert len(others) == 2 and len({p.subject for p in others}) == 2
    assert all(p.subject != "The Eiffel Tower" and p.template == "{} is in Paris" for p in others)
    assert sim.other_subjects("{} x", "A", pool, n=10) == sim.other_subjects("{} x", "A", pool, n=10)


def test_probe_keys_and_edit_strength_on_a_model(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    cov = KeyCovariance(LAYER, n_tokens=400, seq_len=32, progress=True).fit(model, hf_tiny.TRAINING_TEXT)
    fact = sim.Probe("{} is located in", "The Eiffel Tower")
    probes = [fact, *sim.shuffled_subjects(model.tokenizer, fact.template, fact.subject, n=3),
              *sim.other_subjects(fact.template, fact.subject, ["Big Ben", "Apple A5"]),
              sim.long_context(model.tokenizer, fact.template, fact.subject, hf_tiny.TRAINING_TEXT, n_tokens=40)]
    keys = sim.probe_keys(model, probes, LAYER)  # (n, d_mlp)
    s = sim.edit_strength(keys, keys[0], cov)
    assert s.shape == (len(probes),) and s[0].item() == pytest.approx(1.0, abs=1e-9)
    assert torch.isfinite(s).all()
