"""The paper's lemmas checked on real edits (Yan et al., "Keys to Robust Edits", Sec. 4).

For each edited fact (known facts, as in :mod:`keyscope.evaluation.evaluate`), with ``ε₁`` the logit gap (true − new)
before the edit and ``ε₂`` the gap (new − true) after it, at the prompt's last position. Every method of the
registry whose edits state the value they write (:meth:`~keyscope.editing.base.ModelEdit.value_direction`) is
checked: ROME and MEMIT, and their REP adaptors.

**Edit strength of a multi-layer edit.** A method may write a fact over several layers (MEMIT). Its strength
on the keys ``{l: k_l}`` a query has at the edited layers is the combined strength
``α = Σ_l w_l s_l(k_l)`` (:meth:`~keyscope.editing.base.ModelEdit.combined_strength`): the projection, in units of
``Δv* = Σ_l ΔW_l k_{i,l}`` (what the edit writes at the request's own keys), of what it writes at those keys
(Lemma 4.1 summed over the layers). For one layer it is ROME's ``s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*``. The "value" of a
query is the sum of the edited layers' MLP outputs at its position.

**Lemma 4.4** (Δv must be large and aligned). The edit changes what the heads after its last edited layer
read at the subject's last token by ``Δv``: for a one-layer edit (ROME) the value there (the value hook; by
Lemma 4.1 it is ``α(k₀)·(v* − W k*)``; the layer's own attention does not see its MLP output, so it is also
the residual change after the layer); for a multi-layer edit (MEMIT) the residual change after the last edited
layer (which also carries the earlier layers' changes moved on by attention). A head ``h`` of a later layer
carries it to the last position as ``a_h · Δvᵀ m_h`` of the new-vs-true logit difference, where, with the
norms' scales frozen at their clean values (``s₁`` at the subject for the head's pre-norm, ``s_f`` at the last
position for the final norm; centring ``P = I − 11ᵀ/d`` for LayerNorm, ``P = I`` for RMSNorm)::

    m_h = P (γ₁ ⊙ W_V^h W_O^h P (γ_f ⊙ (w_new − w_true)) / s_f) / s₁

and ``a_h`` its attention weight from the last position to the subject. Reported per edit and per method that
computes its own edit (not for adaptors, which write the same ``ΔW``): the largest single-head gain with
``a_h = 1`` (the lemma's bound) and with the actual ``a_h``, whether it reaches ``ε₁ + ε₂``, and the
Cauchy–Schwarz lower bound ``‖Δv‖ ≥ (ε₁ + ε₂) / max_h ‖m_h‖`` against the actual ``‖Δv‖``.

**Lemma 4.6** (robustness). For every rephrased, shuffled and long-context query of the fact, the edit
strength ``α`` of its keys (the adapted keys ``k̂`` under REP, read as the base edit's strength on them)
predicts how much of the edit reaches it: the AUROC of ``α`` for whether the query succeeds after the edit
(new target top-1), per method. Beside it, a **consistency check** (``value_check_pearson``), not evidence for
any lemma: the Pearson correlation between the predicted value change ``α`` (in units of ``Δv*``) and the
hooked one, ``(v' − v)ᵀΔv* / ‖Δv*‖²`` with ``v`` the summed values at the query's subject token. For ROME it is
1 by construction (Lemma 4.1 is an identity of the rank-one update), so it only checks that keyscope's hooks
read the values the edit writes; under REP the adapted key also moves the old value, ``W(k̂ − k)``. For MEMIT
it is not an identity: the update of an earlier layer moves the keys of the later ones, so ``W_l(k'_l − k_l)``
enters the hooked change beside ``α``.

The lemma reads ``α`` at the subject's last token. A rephrased form that ends in a suffix ("… the Elder")
or a place ("… of Telmar") carries the original name *before* its last token, where the edit lands in full
(``α ≈ 1``) and travels on by attention; so the AUROC is also reported for ``α_max``, the largest strength
over the query's positions.

**Lemma 4.7** (specificity). For neighbourhood prompts and the top corpus-scan prefixes of ``k*``
(:mod:`keyscope.analysis.scan`), ``α`` (the largest over the prompt's positions; at the hit for scan prefixes) against
the measured change of their own prediction: the drop in log-probability of the unedited top-1 token and
whether the top-1 flips (AUROC of ``α`` for a flip) — reported for the two groups separately, each with its
number of flips (the positives of its AUROC), and pooled. The prompts are one set per fact, shared by every
method so the methods are compared on the same prompts: the corpus-scan prefixes are those of ROME's ``k*`` at
the run's layer (the model's default edit layer, which for factworld is the causal trace's), whichever methods
run.

"A single path carries the change" means one attention head of a later layer, reading the edited value at the
subject's last token, moves the new-vs-true logit difference at the last position by at least ``ε₁ + ε₂`` on
its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.predictions import prompt_context, sample_known_facts, target_context
from keyscope.data.corpus import ContextSource
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import KINDS, fact_probes, subject_forms
from keyscope.data.prompts import encode, length_batches, locate, pad_batch
from keyscope.editing import rep, rome
from keyscope.editing.base import EDITORS, ModelEdit, check_methods, make_editor, prepare_context
from keyscope.model.capture import Site, capture
from keyscope.model.models import (
    attention_norm,
    attention_norm_scale_hook,
    attention_pattern_hook,
    final_norm,
    final_norm_scale_hook,
    head_ov,
    key_hook,
    model_name,
    n_layers,
    residual_hook,
    value_hook,
)

__all__ = ["BoundsConfig", "BoundsResult", "lemma_4_4", "observe", "run", "auroc", "pearson"]

SPECIFICITY_KINDS = ("neighbourhood", "corpus")


@dataclass(frozen=True)
class BoundsConfig:
    """How many edits, which queries, and the corpus scan for Lemma 4.7. No I/O."""

    n: int = 50
    seed: int = 0
    methods: tuple[str, ...] = ("rome", "rome+rep")
    scan_tokens: int = 50_000
    scan_top_k: int = 5
    scan_prefix_tokens: int = 12
    batch_size: int = 32


# ---------------------------------------------------------------------------------------------- statistics


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (ties counted half); ``None`` with one class."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; ``None`` for fewer than 3 points or a constant series."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------------------------------------- Lemma 4.4


@torch.no_grad()
def lemma_4_4(model, edit: ModelEdit, fact: Fact, method: str = "rome") -> dict | None:
    """Lemma 4.4 for one edit (``edit`` of ``method``, of the one request ``fact``) on its own prompt (module
    docstring); ``None`` if the edit's last layer is the model's last (no head after it)."""
    last_layer = edit.layers[-1]
    later = range(last_layer + 1, n_layers(model))
    if not later:
        return None
    # what the later heads read at the subject: the value of a one-layer edit (the same as the residual after it,
    # and so ROME's numbers), the residual after the last layer of a multi-layer one
    read_hook = value_hook(last_layer) if len(edit.layers) == 1 else residual_hook(last_layer)
    tokenizer = model.tokenizer
    encoded, subject_pos = locate(tokenizer, fact.prompt, fact.subject)
    context, new_id = target_context(tokenizer, fact.filled_prompt, fact.target_new)
    _, true_id = target_context(tokenizer, fact.filled_prompt, fact.target_true)
    ids = torch.as_tensor([context], device=model.cfg.device)  # (1, pos)
    last = len(context) - 1
    names = {attention_norm_scale_hook(b) for b in later} | {attention_pattern_hook(b) for b in later}
    names |= {final_norm_scale_hook(), read_hook}
    with capture(model, [Site(name, torch.Tensor.detach) for name in sorted(names)]) as cache:
        logits = model(ids)  # (1, pos, vocab)
    eps1 = float(logits[0, last, true_id] - logits[0, last, new_id])
    with edit.applied(model), capture(model, [Site(read_hook, torch.Tensor.detach)]) as edited_cache:
        edited = model(ids)  # (1, pos, vocab)
    eps2 = float(edited[0, last, new_id] - edited[0, last, true_id])
    delta_v = (edited_cache[read_hook][0, subject_pos] - cache[read_hook][0, subject_pos]).double()  # (d_model,)
    W_U = model.W_U.detach()  # (d_model, d_vocab)
    direction = (W_U[:, new_id] - W_U[:, true_id]).double()  # (d_model,)
    final = final_norm(model)
    read = final.adjoint(direction, float(cache[final_norm_scale_hook()][0, last]))  # (d_model,)
    best = {"unit": -math.inf, "attention": -math.inf, "norm": 0.0, "head": None}
    for block in later:
        W_V, W_O = head_ov(model, block)  # (H, d_model, d_head), (H, d_head, d_model)
        through = torch.einsum("hmd,hdn,n->hm", W_V.double(), W_O.double(), read)  # (H, d_model)
        scale = float(cache[attention_norm_scale_hook(block)][0, subject_pos])
        m = attention_norm(model, block).adjoint(through, scale)  # (H, d_model)
        gains = m @ delta_v  # (H,)
        weights = cache[attention_pattern_hook(block)][0, :, last, subject_pos].double()  # (H,)
        for h in range(len(gains)):
            if float(gains[h]) > best["unit"]:
                best["unit"], best["head"] = float(gains[h]), (block, h)
            best["attention"] = max(best["attention"], float(weights[h] * gains[h]))
            best["norm"] = max(best["norm"], float(m[h].norm()))
    needed = eps1 + eps2
    norm_bound = needed / best["norm"] if best["norm"] > 0 and needed > 0 else 0.0
    return {
        "case_id": fact.case_id, "method": method, "eps1": eps1, "eps2": eps2, "needed": needed,
        "best_gain_unit": best["unit"], "best_gain_attention": best["attention"], "best_head": best["head"],
        "single_head_holds": best["unit"] >= needed, "delta_v_norm": float(delta_v.norm()),
        "norm_bound": norm_bound, "norm_bound_holds": float(delta_v.norm()) >= norm_bound,
    }


# ---------------------------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class Observation:
    """A forward pass over prompts with whatever edit/adaptor is applied: per prompt the edit's (combined)
    strength at a chosen position and the largest over all positions, the values ``{layer: (n, d_model)}`` there,
    and the last position's log-probabilities."""

    alpha: torch.Tensor  # (n,)
    alpha_max: torch.Tensor  # (n,)
    values: Mapping[int, torch.Tensor]  # {layer: (n, d_model)}
    log_probs: torch.Tensor  # (n, d_vocab)

    def value(self, layers: Sequence[int]) -> torch.Tensor:
        """The summed values of ``layers`` ``(n, d_model)`` float64."""
        return sum(self.values[layer].double() for layer in layers)

    def rows(self, lo: int, hi: int) -> Observation:
        """The observation of prompts ``lo:hi``."""
        return Observation(self.alpha[lo:hi], self.alpha_max[lo:hi],
                           {layer: v[lo:hi] for layer, v in self.values.items()}, self.log_probs[lo:hi])


@torch.no_grad()
def observe(model, layers: int | Sequence[int], sequences: Sequence[Sequence[int]], positions: Sequence[int],
            batch_size: int = 32, edit: ModelEdit | None = None) -> Observation:
    """Run ``sequences`` (token ids) in right-padded batches with ``edit`` applied (none: the unedited model),
    capturing the keys and values of ``layers`` and of every layer ``edit`` edits, and the logits at each row's
    last token. ``alpha`` is ``edit``'s combined strength on its layers' keys
    (:meth:`~keyscope.editing.base.ModelEdit.combined_strength`; ROME's ``s(k)`` for one layer); for an edit that
    adapts a base edit's keys (REP) the base edit's strength on the adapted keys the pass used (Lemma 4.6 with
    REP's keys); zero without an edit."""
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layers = [layers] if isinstance(layers, int) else list(layers)
    edited = tuple(edit.layers) if edit is not None else ()
    layers = sorted({*layers, *edited})
    n = len(sequences)
    alpha = torch.zeros(n)
    alpha_max = torch.zeros(n)
    values = {layer: torch.zeros((n, int(model.cfg.d_model))) for layer in layers}
    log_probs: list[torch.Tensor | None] = [None] * n

    # the first captures are registered before the edit's own hooks, so they read the keys that the edit's hooks
    # receive; an adapter's edit (REP on ROME's or MEMIT's) is read after its hooks too: its α is the base edit's
    # strength on the very adapted keys the forward pass used (one dropout draw, where dropout stays on at inference)
    base = getattr(edit, "base", None)
    before = [Site(key_hook(layer), torch.Tensor.detach) for layer in edited]
    before += [Site(value_hook(layer), torch.Tensor.detach) for layer in layers]
    after = [Site(key_hook(layer), torch.Tensor.detach) for layer in edited] if base is not None else []
    with capture(model, before) as first, (edit.applied(model) if edit is not None else nullcontext()), \
            capture(model, after) as adapted:
        for rows in length_batches([len(s) for s in sequences], batch_size):
            input_ids, mask = pad_batch([sequences[i] for i in rows], pad_id, "right", device=model.cfg.device)
            logits = model(input_ids, attention_mask=mask, return_type="logits")  # (batch, pos, vocab)
            if edit is not None:
                read = adapted if base is not None else first
                keys = {layer: read[key_hook(layer)].float() for layer in edited}  # {layer: (batch, pos, d_mlp)}
                strength = (base if base is not None else edit).combined_strength(keys)  # (batch, pos)
                strength = strength.masked_fill(mask.to(strength.device) == 0, -math.inf)
            for r, i in enumerate(rows):
                length = len(sequences[i])
                if edit is not None:
                    alpha[i] = float(strength[r, positions[i]])
                    alpha_max[i] = float(strength[r, 1 if length > 1 else 0 : length].max())  # BOS excluded
                for layer in layers:
                    values[layer][i] = first[value_hook(layer)][r, positions[i]].float().cpu()
                log_probs[i] = logits[r, length - 1].float().log_softmax(-1).cpu()
    return Observation(alpha, alpha_max, values, torch.stack(log_probs) if n else torch.zeros((0, 1)))


# ---------------------------------------------------------------------------------------------- run


@dataclass
class BoundsResult:
    """Per-edit Lemma 4.4 rows, per-query rows for Lemmas 4.6/4.7, and the summary."""

    model: str
    layer: int
    lemma_4_4_rows: list[dict] = field(repr=False)
    query_rows: list[dict] = field(repr=False)
    summary: dict
    config: BoundsConfig
    skipped: list[dict] = field(default_factory=list)
    edit_layers: dict[str, list[int]] = field(default_factory=dict)  # the layers each edit method writes
    settings: dict = field(default_factory=dict)  # the editors' configs (EditContext.settings)

    @property
    def n_edited(self) -> int:
        """The number of facts edited (each by every method)."""
        return len({r["case_id"] for r in (*self.lemma_4_4_rows, *self.query_rows)})

    def as_json(self) -> dict:
        return {"n": self.n_edited, "model": self.model, "layer": self.layer, **self.summary,
                "edit_layers": self.edit_layers, "config": asdict(self.config), "skipped": self.skipped,
                **self.settings}


def _specificity(rows: list[dict]) -> dict:
    """Lemma 4.7 over ``rows``: AUROC of α for a flipped top-1, its positives (flips), Pearson(α, drop of the
    own log-probability), the flip rate and the count."""
    return {"auroc": auroc([r["alpha"] for r in rows], [r["flipped"] for r in rows]),
            "positives": sum(bool(r["flipped"]) for r in rows),
            "pearson": pearson([r["alpha"] for r in rows], [-r["own_logprob_change"] for r in rows]),
            "flip_rate": float(np.mean([r["flipped"] for r in rows])) if rows else None,
            "n_queries": len(rows)}


def edit_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods that compute their own edit among ``methods`` or as the base of one of them, in order (the
    edits Lemma 4.4 is checked on; an adaptor writes its base's ``ΔW``)."""
    return tuple(dict.fromkeys(EDITORS[m].base or m for m in methods))


def _lemma_4_4_summary(valid: list[dict]) -> dict:
    """The fractions and medians of Lemma 4.4 rows (``None`` without any)."""
    def median(key):
        return float(np.median([r[key] for r in valid])) if valid else None

    def fraction(values):
        return float(np.mean(values)) if valid else None

    return {
        "holds_fraction": fraction([r["single_head_holds"] for r in valid]),
        "attention_weighted_holds_fraction": fraction([r["best_gain_attention"] >= r["needed"] for r in valid]),
        "norm_bound_holds_fraction": fraction([r["norm_bound_holds"] for r in valid]),
        "median_needed": median("needed"),
        "median_best_gain_unit": median("best_gain_unit"),
        "median_delta_v_norm": median("delta_v_norm"),
        "median_norm_bound": median("norm_bound"),
    }


def summarize(l44: list[dict | None], rows: list[dict], methods: Sequence[str]) -> dict:
    """The lemma summary of a run's per-edit Lemma 4.4 rows (``None`` for an edit without one; a row without a
    ``method`` is of the first method that computes its own edit) and per-query rows
    (:attr:`BoundsResult.summary`); ``methods`` in report order. ``lemma_4_4`` holds the first edit method's
    numbers at its top level and every edit method's under ``methods``."""
    bases = edit_methods(methods)
    valid = [r for r in l44 if r is not None]
    by_method_44 = {b: _lemma_4_4_summary([r for r in valid if (r.get("method") or bases[0]) == b]) for b in bases}
    lemma_4_4 = {**by_method_44[bases[0]], "methods": by_method_44}
    by_method_46, by_method_47 = {}, {}
    for method in methods:
        robust = [r for r in rows if r["method"] == method and r["kind"] in KINDS]
        specific = [r for r in rows if r["method"] == method and r["kind"] in SPECIFICITY_KINDS]
        by_method_46[method] = {
            "auroc": auroc([r["alpha"] for r in robust], [r["success"] for r in robust]),
            "auroc_alpha_max": auroc([r["alpha_max"] for r in robust], [r["success"] for r in robust]),
            "positives": sum(bool(r["success"]) for r in robust),
            "value_check_pearson": pearson([r["alpha"] for r in robust], [r["value_coefficient"] for r in robust]),
            "pearson_logit_gap": pearson([r["alpha"] for r in robust], [r["gap_change"] for r in robust]),
            "n_queries": len(robust),
            "by_kind": {k: auroc([r["alpha"] for r in robust if r["kind"] == k],
                                 [r["success"] for r in robust if r["kind"] == k]) for k in KINDS},
        }
        by_method_47[method] = {
            **_specificity(specific),
            **{group: _specificity([r for r in specific if r["kind"] == group]) for group in SPECIFICITY_KINDS},
        }
    first = methods[0]
    return {
        "lemma_4_4": lemma_4_4,
        "lemma_4_6": {"auroc": by_method_46[first]["auroc"], "positives": by_method_46[first]["positives"],
                      "value_check_pearson": by_method_46[first]["value_check_pearson"], "methods": by_method_46},
        "lemma_4_7": {**{k: by_method_47[first][k] for k in ("auroc", "pearson", "positives", "n_queries")},
                      **{group: by_method_47[first][group] for group in SPECIFICITY_KINDS}, "methods": by_method_47},
    }


def _robustness_rows(edit: ModelEdit, queries, method, before: Observation, after: Observation, new_id, true_id,
                     kinds) -> list[dict]:
    direction = edit.value_direction().double().cpu()  # (d_model,) Δv*
    scale = float(direction @ direction)
    changes = after.value(edit.layers) - before.value(edit.layers)  # (n, d_model) of the summed values
    out = []
    for i, kind in enumerate(kinds):
        change = changes[i] @ direction / scale if scale > 0 else 0.0
        gap_before = float(before.log_probs[i, new_id] - before.log_probs[i, true_id])
        gap_after = float(after.log_probs[i, new_id] - after.log_probs[i, true_id])
        out.append({"case_id": queries.fact.case_id, "method": method, "kind": kind, "alpha": float(after.alpha[i]),
                    "alpha_max": float(after.alpha_max[i]),
                    "success": int(after.log_probs[i].argmax()) == new_id, "value_coefficient": float(change),
                    "gap_change": gap_after - gap_before})
    return out


def _specificity_rows(case_id, method, before: Observation, after: Observation, kinds, use_max) -> list[dict]:
    out = []
    for i, kind in enumerate(kinds):
        top = int(before.log_probs[i].argmax())
        out.append({"case_id": case_id, "method": method, "kind": kind,
                    "alpha": float(after.alpha_max[i] if use_max[i] else after.alpha[i]),
                    "flipped": int(after.log_probs[i].argmax()) != top,
                    "own_logprob_change": float(after.log_probs[i, top] - before.log_probs[i, top])})
    return out


def run(model, facts: Sequence[Fact], layer: int, cov, context_docs, corpus=None, config: BoundsConfig | None = None,
        rome_config: rome.ROMEConfig | None = None, rep_config: rep.REPConfig | None = None,
        progress: bool = True, load_covariance=None) -> BoundsResult:
    """Edit ``config.n`` known facts and collect Lemma 4.4/4.6/4.7 evidence (module docstring). Each method that
    computes its own edit (:func:`edit_methods`: ROME at ``layer``, MEMIT over its layers, whose covariances come
    from ``load_covariance(L)``, as :func:`keyscope.editing.base.prepare_context` takes it) edits every fact alone (one
    request per edit); adaptors adapt their base's edit. A fact that one of them cannot edit is skipped for all,
    so the methods are compared on the same facts and the same prompts (module docstring)."""
    from tqdm.auto import tqdm

    from keyscope.analysis.scan import ScanConfig, scan_corpus
    from keyscope.evaluation import evaluate as ev

    config = config or BoundsConfig()
    methods = check_methods(config.methods)
    bases = edit_methods(methods)
    tokenizer = model.tokenizer
    chosen, _ = sample_known_facts(model, facts, config.n, config.seed, batch_size=config.batch_size)
    eval_config = ev.EvalConfig(n=config.n, seed=config.seed)
    forms = subject_forms(facts)
    contexts = ContextSource.of(context_docs)  # one for every fact: each long context has text of its own
    edit_context = prepare_context(model, layer, cov, methods, facts, corpus, {"rome": rome_config, "rep": rep_config},
                                   eval_config.n_corpus_negatives, config.seed, config.batch_size, load_covariance)
    editors = {name: make_editor(name, model, edit_context) for name in dict.fromkeys((*bases, *methods))}
    edits, skipped = [], []
    for fact in tqdm(chosen, desc=f"{', '.join(bases)} edits", disable=not progress):
        try:
            done = {name: editors[name].compute([ev.fact_request(fact)]) for name in bases}
        except KeyscopeError as exc:
            skipped.append({"case_id": fact.case_id, "reason": str(exc)})
            continue
        for edit in done.values():
            edit.value_direction()  # a method that does not state what it writes: one line, before any lemma
        edits.append((fact, done))
    if not edits:
        raise KeyscopeError(f"no fact could be edited ({len(skipped)} skipped)")
    scan = None
    if corpus is not None and config.scan_top_k:
        # one set of specificity prompts per fact for every method: the corpus prefixes of ROME's k* at `layer`
        k_stars = [done["rome"].edits[0].k_star if "rome" in done else
                   rome.edit_key(model, ev.fact_request(fact), layer, edit_context.prefixes, edit_context.config("rome"))
                   for fact, done in edits]
        scan = scan_corpus(model, [f for f, _ in edits], cov, corpus,
                           ScanConfig(layer, n_tokens=config.scan_tokens, top_k=config.scan_top_k,
                                      prefix_tokens=config.scan_prefix_tokens), progress=progress,
                           k_stars=torch.stack(k_stars), filters=("strict",))["strict"]
    l44_rows, rows = [], []
    for j, (fact, done) in enumerate(tqdm(edits, desc="lemmas", disable=not progress)):
        l44_rows += [lemma_4_4(model, done[name], fact, name) for name in bases]
        queries = fact_probes(tokenizer, fact, contexts, eval_config.probes, exclude=forms, other_facts=facts)
        robust, kinds = [], []
        for kind in KINDS:
            for probe in (*queries.perturbed[kind][0], *queries.perturbed[kind][1]):
                encoded, position = locate(tokenizer, probe.template, probe.subject)
                context, _ = target_context(tokenizer, probe.prompt, fact.target_new)
                robust.append((context, position))
                kinds.append(kind)
        _, new_id = target_context(tokenizer, fact.filled_prompt, fact.target_new)
        _, true_id = target_context(tokenizer, fact.filled_prompt, fact.target_true)
        specific, spec_kinds, use_max = [], [], []
        for prompt in fact.neighborhood_prompts:
            context = prompt_context(tokenizer, prompt)
            specific.append((context, len(context) - 1))
            spec_kinds.append("neighbourhood")
            use_max.append(True)
        if scan is not None:
            for prefix in scan.prefixes[j]:
                if prefix.strip():
                    context = list(encode(tokenizer, prefix).ids)
                    specific.append((context, len(context) - 1))
                    spec_kinds.append("corpus")
                    use_max.append(False)
        seqs = [s for s, _ in robust] + [s for s, _ in specific]
        positions = [p for _, p in robust] + [p for _, p in specific]
        edited_layers = sorted({layer for edit in done.values() for layer in edit.layers})
        before = observe(model, edited_layers, seqs, positions, config.batch_size)
        method_edits, _ = ev.compute_edits(editors, [ev.fact_request(fact)], [queries], done)
        n_robust = len(robust)
        for method in methods:
            edit = method_edits[method]
            after = observe(model, edit.layers, seqs, positions, config.batch_size, edit)
            rows += _robustness_rows(edit, queries, method, before.rows(0, n_robust), after.rows(0, n_robust),
                                     new_id, true_id, kinds)
            rows += _specificity_rows(fact.case_id, method, before.rows(n_robust, len(seqs)),
                                      after.rows(n_robust, len(seqs)), spec_kinds, use_max)
    summary = summarize(l44_rows, rows, methods)
    edit_layers = {name: list(edits[0][1][name].layers) for name in bases}
    return BoundsResult(model_name(model), layer, [r for r in l44_rows if r is not None], rows, summary, config,
                        skipped, edit_layers, edit_context.settings())
