from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from keyscope.analysis import scan
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.similarity import edit_strength_matrix
from keyscope.data.corpus import prepends_bos, token_batches
from keyscope.data.datasets import Fact
from keyscope.model.models import load_model
from keyscope.studies import scan as scan_experiment
from tests import hf_tiny, reference

LAYER = 1
CORPUS = hf_tiny.TRAINING_TEXT


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["gpt2"]))


@pytest.fixture(scope="module")
def cov(model):
    return KeyCovariance(LAYER, n_tokens=600, seq_len=32, progress=False).fit(model, CORPUS)


@pytest.fixture(scope="module")
def facts():
    return [
        Fact(0, "{} is located in", "The Eiffel Tower", "Rome", "Paris"),
        Fact(1, "{} played basketball for", "Michael Jordan", "Lakers", "Bulls"),
        Fact(2, "The capital of {} is", "Slovenia", "Paris", "Ljubljana"),
        Fact(3, "{} was created by", "Apple A5", "Google", "Apple"),
    ]


def _brute_force(model, cov, facts, config, name="strict"):
    """Every key of the scanned stream in memory, scored and masked the slow, obvious way."""
    tok = model.tokenizer
    batches = list(token_batches(tok, CORPUS, config.n_tokens, config.seq_len, config.batch_size))
    keys = torch.cat([scan.layer_keys_of(model, b, LAYER) for b in batches])  # (N, d)
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    k_stars = scan.subject_keys(model, facts, LAYER)
    scores = edit_strength_matrix(keys, k_stars, cov)  # (N, S) float64
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    for j, fact in enumerate(facts):
        for variant in scan.filter_variants(tok, fact)[name]:
            m = len(variant)
            for t in range(m - 1, len(stream)):
                if tuple(stream[t - m + 1 : t + 1]) == variant:
                    first = t - m + 1 if name == "strict" else t  # strict: the whole occurrence
                    excluded[first : t + config.window + 1, j] = True
    return scores.masked_fill(excluded, float("-inf")), excluded, batches


@pytest.mark.parametrize("batch_size,seq_len,name", [(2, 16, "strict"), (3, 24, "strict"), (3, 24, "paper")])
def test_scan_equals_brute_force_topk(model, cov, facts, batch_size, seq_len, name):
    config = scan.ScanConfig(layer=LAYER, n_tokens=500, seq_len=seq_len, batch_size=batch_size, top_k=7, window=4)
    result = scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False)[name]
    masked, excluded, batches = _brute_force(model, cov, facts, config, name)
    assert result.n_tokens == masked.shape[0] == 500
    assert result.n_excluded.tolist() == excluded.sum(0).tolist()
    assert excluded.any(0).all(), "every subject occurs in the corpus and is masked somewhere"
    best, rows = masked.topk(7, dim=0)  # (7, S)
    torch.testing.assert_close(result.scores, best.T.float(), rtol=1e-4, atol=1e-5)
    assert result.positions.tolist() == rows.T.tolist()
    raw_norm = result.raw / result.scores  # raw = score · k*ᵀC⁻¹k*, one constant per subject
    assert torch.allclose(raw_norm, raw_norm[:, :1].expand_as(raw_norm), rtol=1e-4)
    # no hit lies on a masked position, and prefixes end at the hit token
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    for hit in result.neighbours():
        assert not excluded[hit.position, hit.subject_index]
        last = model.tokenizer.decode([stream[hit.position]])
        assert hit.prefix.endswith(last) and hit.prefix.strip()


def test_scan_scores_equal_a_dense_recomputation_at_their_positions(model, cov, facts):
    """The top hits' scores and raw inner products, recomputed for each hit from one unpadded forward pass of
    its window up to the hit token and a numpy solve against ``C`` (no scan, batching or keyscope key code)."""
    config = scan.ScanConfig(layer=LAYER, n_tokens=300, seq_len=24, batch_size=3, top_k=3, window=2)
    result = scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False)["paper"]
    where = [(b, r, c) for b in token_batches(model.tokenizer, CORPUS, config.n_tokens, config.seq_len,
                                              config.batch_size)
             for r, c in b.key_mask.nonzero().tolist()]  # stream position -> (batch, row, column)
    C = cov.C_.numpy() + cov.ridge_ * np.eye(cov.C_.shape[0])
    checked = 0
    for j, fact in enumerate(facts):
        k_star = reference.dense_key(model, fact.prompt, fact.subject, LAYER)  # (d_mlp,)
        for rank in range(config.top_k):
            batch, row, column = where[int(result.positions[j, rank])]
            assert batch.attention_mask[row, : column + 1].all()
            key = reference.dense_keys(model, batch.input_ids[row, : column + 1].tolist(), LAYER)[-1]  # (d_mlp,)
            expected = reference.dense_strength(key, k_star, cov)
            assert float(result.scores[j, rank]) == pytest.approx(expected, rel=1e-3, abs=1e-4), (j, rank)
            assert float(result.raw[j, rank]) == pytest.approx(key @ np.linalg.solve(C, k_star), rel=1e-3, abs=1e-3)
            checked += 1
    assert checked == len(facts) * config.top_k
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()  # best first


def test_filters_mask_the_last_token_or_everything_related():
    tok = hf_tiny.byte_level_bpe_tokenizer()
    fact = Fact(0, "{} is located in", "The Eiffel Tower", "Rome", "Paris", subject_rephrase=("Eiffel Tower",),
                extras={"similar_subjects": ["The Blackpool Tower"], "order_twins": ["Tower The Eiffel"]})
    variants = scan.filter_variants(tok, fact)
    last = {v[-1] for v in scan.subject_token_variants(tok, "The Eiffel Tower", "{} is located in")}
    assert set(variants["paper"]) == {(t,) for t in last}
    strict = set(variants["strict"])
    assert set(variants["paper"]) <= strict
    for form in ("The Eiffel Tower", "Eiffel Tower", "The Blackpool Tower", "Tower The Eiffel", "Tower"):
        assert set(scan.subject_token_variants(tok, form)) <= strict, form


def test_strict_filter_masks_at_least_what_the_paper_filter_masks(model, cov, facts):
    config = scan.ScanConfig(layer=LAYER, n_tokens=400, seq_len=32, batch_size=4, top_k=5, window=3)
    results = scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False)
    assert set(results) == {"paper", "strict"}
    assert (results["strict"].n_excluded >= results["paper"].n_excluded).all()
    assert (results["strict"].scores <= results["paper"].scores + 1e-6).all()
    with pytest.raises(ValueError, match="filter"):
        scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False, filters=("loose",))


def test_prefix_stays_within_the_window_the_model_saw(model, cov, facts):
    config = scan.ScanConfig(layer=LAYER, n_tokens=300, seq_len=16, batch_size=4, top_k=10, prefix_tokens=6)
    result = scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False)["strict"]
    batches = token_batches(model.tokenizer, CORPUS, config.n_tokens, config.seq_len, config.batch_size)
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    width = config.seq_len - int(prepends_bos(model.tokenizer))  # counted tokens per window
    for hit in result.neighbours():
        window_start = hit.position - hit.position % width
        lo = max(window_start, hit.position - config.prefix_tokens + 1)
        assert hit.prefix == model.tokenizer.decode(stream[lo : hit.position + 1], skip_special_tokens=True)


def test_mask_window_and_chunk_boundaries():
    variants = [[(1, 2, 3)], [(7,), (8, 7)]]
    stream = torch.tensor([5, 1, 2, 3, 4, 4, 4, 4, 7, 0, 1, 2, 3, 6, 8, 7, 6, 6])
    one_shot = scan.SubjectMask(variants, window=2)(stream)
    expected = torch.zeros((18, 2), dtype=torch.bool)
    expected[3:6, 0] = expected[12:15, 0] = True  # last token of 1 2 3 and the 2 after it
    expected[8:11, 1] = expected[15:18, 1] = True
    assert torch.equal(one_shot, expected)
    for cut in ([2], [3, 1, 5], [1] * 18, [11, 2, 4]):  # occurrences and masks straddling chunk ends
        masker = scan.SubjectMask(variants, window=2)
        pieces, lo = [], 0
        for size in cut + [18]:
            if lo >= 18:
                break
            pieces.append(masker(stream[lo : lo + size]))
            lo += size
        assert torch.equal(torch.cat(pieces), expected), cut
    assert torch.equal(scan.SubjectMask(variants, window=0)(stream).sum(0), torch.tensor([2, 2]))


def test_lookbehind_mask_covers_the_whole_occurrence_and_is_emitted_late():
    variants = [[(1, 2, 3)], [(7,), (8, 7)]]
    stream = torch.tensor([5, 1, 2, 3, 4, 4, 4, 4, 7, 0, 1, 2, 3, 6, 8, 7, 6, 6])
    expected = torch.zeros((18, 2), dtype=torch.bool)
    expected[1:6, 0] = expected[10:15, 0] = True  # from the first token of 1 2 3 to 2 after its last
    expected[8:11, 1] = expected[14:18, 1] = True  # 8 7 from its 8 on
    with pytest.raises(ValueError):
        scan.SubjectMask(variants, window=2, lookbehind=True, lag=1)
    for lag in (2, 5):
        for cut in ([18], [2], [3, 1, 5], [1] * 18, [11, 2, 4]):
            masker = scan.SubjectMask(variants, window=2, lookbehind=True, lag=lag)
            pieces, lo = [], 0
            for size in cut + [18]:
                if lo >= 18:
                    break
                piece = masker(stream[lo : lo + size])
                assert piece.shape[0] == max(0, min(18, lo + size) - lag) - sum(p.shape[0] for p in pieces)
                pieces.append(piece)
                lo += size
            pieces.append(masker.flush())
            assert torch.equal(torch.cat(pieces), expected), (lag, cut)


def test_strict_scan_never_scores_inside_a_related_name(model, cov, facts):
    config = scan.ScanConfig(layer=LAYER, n_tokens=400, seq_len=16, batch_size=3, top_k=50, window=0)
    results = scan.scan_corpus(model, facts, cov, CORPUS, config, progress=False)
    batches = token_batches(model.tokenizer, CORPUS, config.n_tokens, config.seq_len, config.batch_size)
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    for j, fact in enumerate(facts):
        inside = set()
        for variant in scan.filter_variants(model.tokenizer, fact)["strict"]:
            m = len(variant)
            inside |= {t + i for t in range(len(stream) - m + 1) if tuple(stream[t : t + m]) == variant for i in range(m)}
        assert inside, fact.subject
        strict = {int(p) for p in results["strict"].positions[j] if p >= 0}
        assert not strict & inside
        assert results["strict"].n_excluded[j] >= len(inside)
    # the scores of the positions both filters keep are the same
    paper = results["paper"]
    for j in range(len(facts)):
        shared = set(paper.positions[j].tolist()) & set(results["strict"].positions[j].tolist()) - {-1}
        for position in shared:
            a = paper.scores[j][paper.positions[j] == position]
            b = results["strict"].scores[j][results["strict"].positions[j] == position]
            torch.testing.assert_close(a, b)


def test_window_masks_the_subject_in_the_scan(model, cov, facts):
    narrow = scan.ScanConfig(layer=LAYER, n_tokens=400, seq_len=32, batch_size=4, top_k=5, window=0)
    wide = scan.ScanConfig(layer=LAYER, n_tokens=400, seq_len=32, batch_size=4, top_k=5, window=10)
    a = scan.scan_corpus(model, facts, cov, CORPUS, narrow, progress=False)["strict"]
    b = scan.scan_corpus(model, facts, cov, CORPUS, wide, progress=False)["strict"]
    assert (b.n_excluded > a.n_excluded).all()
    assert (b.scores <= a.scores + 1e-6).all(), "masking more positions can only lower the top scores"


def test_topk_merge_across_chunks_equals_global_topk():
    g = torch.Generator().manual_seed(0)
    d, S, N, k = 16, 5, 300, 6
    W, norms = torch.randn(d, S, generator=g), torch.rand(S, generator=g) + 0.5
    keys = torch.randn(N, d, generator=g)
    excluded = torch.rand(N, S, generator=g) < 0.2
    prefix = torch.arange(N)[:, None].expand(N, 3)
    expected_scores = ((keys @ W) / norms).masked_fill(excluded, float("-inf"))
    best, rows = expected_scores.topk(k, dim=0)
    for sizes in ([N], [1] * 40 + [N], [7, 13, 2, 100, N]):
        acc = scan.NeighbourTopK(W, norms, k, prefix_tokens=3)
        lo, sizes_used = 0, []
        for size in sizes:
            if lo >= N:
                break
            hi = min(N, lo + size)
            acc.add(keys[lo:hi], excluded[lo:hi], torch.arange(lo, hi), prefix[lo:hi])
            sizes_used.append(acc.state_nbytes())
            lo = hi
        torch.testing.assert_close(acc.scores, best)
        assert torch.equal(acc.positions, rows)
        assert torch.equal(acc.prefix_ids[:, :, 0], rows)
        torch.testing.assert_close(acc.raw, (keys @ W)[rows, torch.arange(S)])


def test_memory_does_not_grow_with_the_corpus():
    g = torch.Generator().manual_seed(1)
    d, S, k = 8, 3, 4
    acc = scan.NeighbourTopK(torch.randn(d, S, generator=g), torch.ones(S), k, prefix_tokens=5)
    masker = scan.SubjectMask([[(1, 2)], [(3,)], [(4, 5, 6)]], window=3)
    sizes, mask_sizes = [], []
    for step in range(200):
        ids = torch.randint(0, 8, (32,), generator=g)
        acc.add(torch.randn(32, d, generator=g), masker(ids), torch.arange(step * 32, step * 32 + 32), torch.zeros(32, 5, dtype=torch.long))
        sizes.append(acc.state_nbytes())
        mask_sizes.append(masker.state_size())
    assert len(set(sizes[1:])) == 1 and len(set(mask_sizes[1:])) == 1


def test_subject_token_variants_cover_leading_space(model):
    variants = scan.subject_token_variants(model.tokenizer, "Paris", "{} is big")
    tok = model.tokenizer
    assert tuple(tok("Paris", add_special_tokens=False)["input_ids"]) in variants
    assert tuple(tok(" Paris", add_special_tokens=False)["input_ids"]) in variants


def test_scan_config_validates():
    with pytest.raises(ValueError):
        scan.ScanConfig(layer=0, top_k=0)
    with pytest.raises(ValueError):
        scan.ScanConfig(layer=0, window=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.ScanConfig(layer=0).top_k = 3


def test_rephrase_scores_are_per_fact(model, cov):
    facts = [
        Fact(0, "{} is located in", "The Eiffel Tower", "Rome", "Paris", subject_rephrase=("Eiffel Tower", "the Tower")),
        Fact(1, "{} was created by", "Apple A5", "Google", "Apple"),
    ]
    scores = scan_experiment.rephrase_scores(model, facts, cov, LAYER)
    assert [len(s) for s in scores] == [2, 0]
    k_star = reference.dense_key(model, facts[0].prompt, facts[0].subject, LAYER)
    rephrased = np.stack([reference.dense_key(model, facts[0].prompt, r, LAYER) for r in facts[0].subject_rephrase])
    np.testing.assert_allclose(scores[0].numpy(), reference.dense_strength(rephrased, k_star, cov), rtol=1e-3, atol=1e-4)
    same = scan_experiment.rephrase_scores(model, [Fact(0, "{} is located in", "Paris", "x", "y", subject_rephrase=("Paris ",))], cov, LAYER)
    assert same[0].shape == (1,)


def test_scan_scores_with_any_score_and_layers_equals_brute_force(model, cov, facts):
    """The generic core: a nonlinear score of the keys of two layers, with a threshold count."""
    config = scan.ScanConfig(layer=LAYER, n_tokens=500, seq_len=24, batch_size=3, top_k=5, window=4)
    masked, excluded, batches = _brute_force(model, cov, facts, config)  # the strict exclusion of 4 subjects
    generator = torch.Generator().manual_seed(0)
    u = {layer: torch.randn(model.cfg.d_mlp, len(facts), generator=generator) for layer in (0, LAYER)}

    def score(keys):  # (P, S): a nonlinear function of both layers' keys
        return torch.tanh(keys[0].float() @ u[0] / 8) + torch.relu(keys[LAYER].float() @ u[LAYER] / 8)

    thresholds = torch.tensor([0.5, 0.0, 1.0, -0.5])
    variants = [scan.filter_variants(model.tokenizer, f)["strict"] for f in facts]
    result = scan.scan_scores(model, iter(batches), score, len(facts), {"strict": variants}, config, progress=False,
                              layers=(0, LAYER), thresholds=thresholds)["strict"]
    for batch in batches[:2]:
        both = scan.keys_at_layers(model, batch, (0, LAYER))
        for layer in (0, LAYER):
            torch.testing.assert_close(both[layer], scan.layer_keys_of(model, batch, layer))
    dense = torch.cat([score({layer: scan.layer_keys_of(model, b, layer) for layer in (0, LAYER)}) for b in batches])
    dense = dense.masked_fill(excluded, float("-inf"))  # (N, S)
    best, rows = dense.topk(5, dim=0)
    torch.testing.assert_close(result.scores, best.T, rtol=1e-4, atol=1e-5)
    assert result.positions.tolist() == rows.T.tolist()
    assert result.n_above.tolist() == (dense > thresholds).sum(0).tolist()
    assert result.n_excluded.tolist() == excluded.sum(0).tolist()


def test_ties_are_broken_by_stream_position_whatever_the_chunking_or_sharding():
    """Equal scores rank by earlier stream position (a total order), so chunked, sharded-and-merged and
    all-at-once top-k lists are the same, ties included."""
    g = torch.Generator().manual_seed(2)
    N, S, k = 120, 3, 9
    scores = torch.randint(0, 4, (N, S), generator=g).float()  # (N, S): many exact ties
    excluded = torch.rand(N, S, generator=g) < 0.1
    prefix = torch.arange(N)[:, None].expand(N, 2)
    masked = scores.masked_fill(excluded, float("-inf"))
    expected = torch.stack([torch.tensor(sorted(range(N), key=lambda i: (-float(masked[i, j]), i))[:k])
                            for j in range(S)], dim=1)  # (k, S)

    def top(chunks):
        acc = scan.ScoreTopK(lambda keys: keys, S, k, prefix_tokens=2)
        for lo, hi in chunks:
            hi = min(hi, N)
            acc.add(scores[lo:hi], excluded[lo:hi], torch.arange(lo, hi), prefix[lo:hi])
        return acc

    whole = top([(0, N)])
    assert torch.equal(whole.positions, expected) and torch.equal(whole.prefix_ids[:, :, 0], expected)
    assert torch.equal(top([(lo, lo + 7) for lo in range(0, N, 7)]).positions, expected)
    cuts = list(range(0, N, 10))
    shards = [top([(lo, lo + 10) for lo in cuts[r::3]]) for r in range(3)]  # 3 ranks, strided batches
    merged = scan.ScoreTopK(lambda keys: keys, S, k, prefix_tokens=2)
    for shard in shards:
        merged.merge(scan.ScoreTopK(lambda keys: keys, S, k, prefix_tokens=2).load_state_dict(shard.state_dict()))
    assert torch.equal(merged.positions, expected) and torch.equal(merged.scores, whole.scores)
    assert sum(int(s.n_excluded.sum()) for s in shards) == int(excluded.sum())
    assert torch.equal(merged.n_excluded, whole.n_excluded)
