from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from keyscope._infra.errors import (
    KeyscopeError,
    LayerOutOfRange,
    MalformedRecord,
    SubjectNotFound,
    UnknownToken,
)
from keyscope.analysis import similarity as sim
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.keys import collect_keys
from keyscope.data import perturbations as pt
from keyscope.data.prompts import encode, fill, locate
from keyscope.editing import prefixes as prefixes_module
from keyscope.editing import rome
from keyscope.editing.optimise import teacher_forced, v_star_batch
from keyscope.editing.prefixes import context_prefixes, sample_context_prefixes
from keyscope.editing.request import EditRequest, EmptyTarget, check_request_tokens
from keyscope.model.models import (
    W_out,
    b_out,
    hf_prepends_bos,
    hf_state_dict,
    load_model,
    save_model,
    value_hook,
)
from keyscope.model.replay import PrefixCached
from tests import hf_tiny

LAYER = 1
ARCHS = ("gpt2", "llama")
#: The subject ends the prompt, so the target is predicted at the edited token itself: on a *random* tiny
#: model that is the one place where δ reliably reaches the logits (a relation phrase after the subject
#: would need attention heads that read the subject, which random weights lack).
REQUEST = EditRequest("The actress {}", "Danielle Darrieux", "Paris", target_true="French")
OTHER = EditRequest("{} played basketball for the", "Michael Jordan", "Lakers")


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {arch: load_model(str(tiny_checkpoints[arch])) for arch in ARCHS}


def _fit_cov(model) -> KeyCovariance:
    return KeyCovariance(LAYER, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)


@pytest.fixture(scope="module")
def covs(models):
    return {arch: _fit_cov(model) for arch, model in models.items()}


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    """The tiny LLaMA with a GPT-2-style byte-level BPE that adds no BOS (SmolLM2-135M's setting): path, model, C."""
    path = hf_tiny.save_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_bpe") / "llama",
                                        tokenizer=hf_tiny.byte_level_bpe_tokenizer())
    model = load_model(str(path))
    return path, model, _fit_cov(model)


@pytest.fixture(scope="module")
def edits(models, covs):
    return {arch: rome.compute_edit(models[arch], REQUEST, LAYER, covs[arch]) for arch in ARCHS}


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.original_model.named_parameters()}


def _same_params(model, snapshot) -> bool:
    current = dict(model.original_model.named_parameters())
    return current.keys() == snapshot.keys() and all(torch.equal(current[n].detach(), snapshot[n]) for n in snapshot)


def _logits(model, text="The actress Danielle Darrieux was born in Paris") -> torch.Tensor:
    ids = torch.tensor([encode(model.tokenizer, text).ids])
    with torch.no_grad():
        return model(ids)


# ------------------------------------------------------------------------------------------- config


class _Stub:
    """A stand-in for a loaded model: its HF config's model_type and, recorded beside it, where it came from."""

    def __init__(self, model_type: str):
        self.original_model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))


def _stub_model(name: str, model_type: str, directory=None):
    from keyscope.model.models import ModelSource, register_source

    model = _Stub(model_type)
    register_source(model, ModelSource(name, directory))
    return model


def test_published_defaults_by_family_and_name():
    def stub(name, model_type):
        return _stub_model(name, model_type)

    gpt2 = rome.ROMEConfig.for_model(stub("gpt2-xl", "gpt2"))
    assert (gpt2.v_num_grad_steps, gpt2.v_lr, gpt2.v_weight_decay, gpt2.clamp_norm_factor, gpt2.kl_factor) == (
        20, 0.5, 0.5, 4.0, 0.0625,
    )
    llama = rome.ROMEConfig.for_model(stub("meta-llama/Llama-2-7b-hf", "llama"))
    assert (llama.v_num_grad_steps, llama.v_weight_decay) == (25, 1e-3)
    assert rome.ROMEConfig.for_model(stub("openai-community/gpt2-medium", "gpt2")).clamp_norm_factor == 3.0
    assert rome.ROMEConfig.for_model(stub("/models/unknown", "somearch")) == rome.ROMEConfig()
    assert llama.context_template_length_params == ((5, 10), (10, 10)) and llama.early_stop_loss == 5e-2
    assert rome.ROMEConfig.for_model(stub("x", "llama"), v_num_grad_steps=3).v_num_grad_steps == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        llama.v_lr = 1.0  # type: ignore[misc]


def test_model_card_settings_override_the_published_ones(tmp_path):
    (tmp_path / "keyscope.json").write_text(json.dumps({"rome_config": {"v_num_grad_steps": 60, "clamp_norm_factor": 6}}))
    model = _stub_model("my-llama", "llama", tmp_path)
    config = rome.ROMEConfig.for_model(model)
    assert (config.v_num_grad_steps, config.clamp_norm_factor, config.v_weight_decay) == (60, 6, 1e-3)
    assert rome.ROMEConfig.for_model(model, v_num_grad_steps=3).v_num_grad_steps == 3
    (tmp_path / "keyscope.json").write_text(json.dumps({"rome_config": {"v_steps": 60}}))
    with pytest.raises(KeyscopeError, match="unknown fields"):
        rome.ROMEConfig.for_model(model)


# ------------------------------------------------------------------------------------------- errors


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def test_request_errors_are_one_line_keyscope_errors(models):
    with pytest.raises(SubjectNotFound) as exc:
        EditRequest("{} is in Paris", "", "Rome")
    _one_line(exc)
    with pytest.raises(SubjectNotFound) as exc:
        EditRequest("The Eiffel Tower is in", "Colosseum", "Rome")
    assert "Colosseum" in _one_line(exc)
    for empty in ("", "   "):
        with pytest.raises(EmptyTarget) as exc:
            EditRequest("{} is in", "The Eiffel Tower", empty)
        assert isinstance(exc.value, KeyscopeError) and "target" in _one_line(exc)
    model = models["llama"]
    for layer in (-1, 3, 99):
        with pytest.raises(LayerOutOfRange) as exc:
            rome.compute_edit(model, REQUEST, layer=layer, cov=KeyCovariance(layer, progress=False))
        _one_line(exc)
    with pytest.raises(SubjectNotFound):
        rome.compute_edit(model, {"prompt": "x", "subject": "y", "target_new": {"str": "z"}}, layer=LAYER)


def test_malformed_requests_and_unknown_tokens_raise_keyscope_errors(models, covs):
    with pytest.raises(MalformedRecord, match="lacks target_new") as exc:
        EditRequest.from_dict({"prompt": "{} is in", "subject": "The Eiffel Tower"})
    _one_line(exc)
    with pytest.raises(MalformedRecord, match="2 subject slots"):  # each {} would be filled, the edit at the first
        EditRequest("{} is as tall as {}", "The Eiffel Tower", "Rome")
    with pytest.raises(MalformedRecord, match="'subject' must be a string"):
        EditRequest("{} is in", 42, "Rome")  # type: ignore[arg-type]
    with pytest.raises(MalformedRecord, match="not list"):
        rome.compute_edit(models["llama"], ["{} is in", "Paris", "Rome"], layer=LAYER, cov=covs["llama"])
    model = models["llama"]  # a BPE without byte fallback: Cyrillic letters are <unk>
    check_request_tokens(model.tokenizer, REQUEST)  # known text passes
    with pytest.raises(UnknownToken, match="'Жупа' of the target 'Жупа'") as exc:
        rome.compute_edit(model, EditRequest("{} is in", "The Eiffel Tower", "Жупа"), LAYER, covs["llama"])
    _one_line(exc)
    with pytest.raises(UnknownToken, match="of the subject 'Жюль Verne'"):
        rome.compute_edit(model, EditRequest("{} is in", "Жюль Verne", "Paris"), LAYER, covs["llama"])
    check_request_tokens(models["gpt2"].tokenizer, EditRequest("{} is in", "Жюль", "Жупа"))  # byte-level


def test_v_star_progress_bar_changes_nothing(models, covs, capsys):
    model = models["llama"]
    config = rome.ROMEConfig.for_model(model, v_num_grad_steps=4)
    quiet = rome.compute_edit(model, REQUEST, LAYER, covs["llama"], config, prefixes=("",))
    assert "v* layer" not in capsys.readouterr().err  # off by default in the library
    shown = rome.compute_edit(model, REQUEST, LAYER, covs["llama"], config, prefixes=("",), progress=True)
    assert "v* layer 1" in capsys.readouterr().err
    assert torch.equal(quiet.v_star, shown.v_star) and quiet.trace.loss == shown.trace.loss


def test_request_from_counterfact_record_and_filled_prompt():
    record = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"},
              "target_true": {"str": "guitar"}}
    request = EditRequest.from_dict(record)
    assert (request.target_new, request.target_true, request.template) == ("piano", "guitar", "{} plays the")
    filled = EditRequest("Toko Yasuda plays the guitar like Toko Yasuda", "Toko Yasuda", "piano")
    assert filled.template == "{} plays the guitar like Toko Yasuda"


# ------------------------------------------------------------------------------------------- k*, v*


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_record_shapes_and_single_key_definition(models, edits, arch):
    model, edit = models[arch], edits[arch]
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    assert edit.layer == LAYER and edit.request == REQUEST
    for tensor, shape in ((edit.k_star, (d_mlp,)), (edit.v_star, (d_model,)), (edit.residual, (d_model,)),
                          (edit.key_selector, (d_mlp,))):
        assert tuple(tensor.shape) == shape and tensor.dtype == torch.float32
    assert edit.delta_W.shape == (d_model, d_mlp)
    # 21 templates: the bare prompt, then 10 prefixes of 5 tokens and 10 of 10 (BOS included)
    assert len(edit.prefixes) == 21 and edit.prefixes[0] == ""
    # k* is the mean key over exactly those prefixed prompts
    templates = [p and f"{p}. {REQUEST.template}" or REQUEST.template for p in edit.prefixes]
    keys = collect_keys(model, templates, [REQUEST.subject] * len(templates), LAYER)
    torch.testing.assert_close(edit.k_star, keys.mean(0), rtol=1e-5, atol=1e-6)
    # v* is the output of W_out (no bias) at that same k*: residual = v* - W k* = δ
    W = W_out(model, LAYER)
    torch.testing.assert_close(edit.v_star, W @ edit.k_star + edit.residual, rtol=1e-5, atol=1e-5)
    assert edit.trace.delta_norm == pytest.approx(float(edit.residual.norm()), rel=1e-5)
    assert 0 < edit.trace.delta_norm <= edit.trace.max_delta_norm * (1 + 1e-5)
    bias = b_out(model, LAYER)
    value = W @ edit.k_star + (bias if bias is not None else 0)
    assert edit.trace.max_delta_norm == pytest.approx(edit.config.clamp_norm_factor * float(value.norm()), rel=1e-5)
    trace = edit.trace
    assert len(trace.loss) == len(trace.nll) == len(trace.kl) == len(trace.target_probability) == trace.n_steps
    assert 1 <= trace.n_steps <= edit.config.v_num_grad_steps and trace.kl[0] == pytest.approx(0, abs=1e-6)
    for seconds in (trace.seconds_prefixes, trace.seconds_k_star, trace.seconds_v_star, trace.seconds_update):
        assert seconds > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_v_star_lowers_target_nll_and_edit_makes_target_top1(models, edits, arch):
    model, edit = models[arch], edits[arch]
    trace = edit.trace
    assert trace.nll[-1] < trace.nll[0] - 0.5  # at least a factor √e on the target likelihood (random tiny models)
    assert trace.target_probability[-1] > 2 * trace.target_probability[0]
    prompt = fill(REQUEST.template, REQUEST.subject).text
    prompt_ids = encode(model.tokenizer, prompt).ids
    first_target = encode(model.tokenizer, f"{prompt} {REQUEST.target_new}").ids[len(prompt_ids)]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        before = model(ids)[0, -1]
        with rome.applied(model, edit):
            after = model(ids)[0, -1]
    assert before.argmax() != first_target
    assert after.argmax() == first_target
    assert after.softmax(-1)[first_target] > 5 * before.softmax(-1)[first_target]


def test_v_star_optimises_delta_only_and_leaves_model_untouched(models, covs):
    model = models["llama"]
    flags = {name: p.requires_grad for name, p in model.original_model.named_parameters()}
    snapshot = _params(model)
    seen = []

    def spy(activation, hook):  # the value the δ hook sees: weights frozen, so no grad before δ is added
        seen.append(activation.requires_grad)

    config = rome.ROMEConfig.for_model(model, v_num_grad_steps=3, early_stop_loss=None)
    with model.hooks(fwd_hooks=[(value_hook(LAYER), spy)]):
        edit = rome.compute_edit(model, REQUEST, LAYER, covs["llama"], config, prefixes=("", "Ljubljana"))
    assert edit.trace.n_steps == 3 and seen and not any(seen)
    assert _same_params(model, snapshot) and model.training is False
    assert {name: p.requires_grad for name, p in model.original_model.named_parameters()} == flags


@pytest.mark.parametrize("arch", ARCHS)
def test_essence_kl_and_weight_decay_terms(models, covs, edits, arch):
    model = models[arch]
    trace = edits[arch].trace
    config = edits[arch].config
    assert trace.weight_decay[-1] == pytest.approx(
        config.v_weight_decay * trace.delta_norm / trace.value_norm**2, rel=1e-4
    )
    free, kept = (
        rome.compute_edit(model, REQUEST, LAYER, covs[arch], dataclasses.replace(
            config, kl_factor=kl_factor, v_num_grad_steps=10, early_stop_loss=None), prefixes=edits[arch].prefixes[:4])
        for kl_factor in (0.0, 1000.0)
    )
    assert free.trace.kl[0] == kept.trace.kl[0] == pytest.approx(0, abs=1e-6)
    assert free.trace.kl[-1] > 1e-4  # δ moves the essence prompt's distribution when nothing holds it
    assert kept.trace.kl[-1] < 0.5 * free.trace.kl[-1]  # the KL term holds it
    assert kept.trace.loss[-1] == pytest.approx(
        kept.trace.nll[-1] + 1000.0 * kept.trace.kl[-1] + kept.trace.weight_decay[-1], rel=1e-4
    )


def test_multi_token_target_is_teacher_forced(models):
    tokenizer = models["llama"].tokenizer
    ids, subject_index, target_ids, positions = teacher_forced(tokenizer, "{} lives in", "Kobe Bryant", "Los Angeles")
    full = encode(tokenizer, "Kobe Bryant lives in Los Angeles")
    assert len(target_ids) >= 2 and list(full.ids) == ids + target_ids[-1:]  # the last target token is not fed
    assert positions == list(range(len(full.ids) - len(target_ids) - 1, len(full.ids) - 1))
    assert [full.ids[p + 1] for p in positions] == target_ids
    assert subject_index == locate(tokenizer, "{} lives in", "Kobe Bryant")[1]


def test_determinism_under_a_seed(models, covs, edits):
    model = models["gpt2"]
    again = rome.compute_edit(model, REQUEST, LAYER, covs["gpt2"])
    first = edits["gpt2"]
    assert again.prefixes == first.prefixes
    for name in ("k_star", "v_star", "residual", "key_selector"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name
    assert again.trace.loss == first.trace.loss
    other_seed = context_prefixes(model, dataclasses.replace(first.config, seed=1))
    assert other_seed[0] == "" and other_seed != first.prefixes


def test_prefixes_from_easyedit_seeds_in_its_order_and_lengths(models, tmp_path, monkeypatch):
    """LLaMA-family models sample their prefixes from EasyEdit's seed words, kept at the start, each seed getting
    ``count // 5`` rows of each ``(length, count)`` group, seed by seed; lengths count the tokenizer's BOS."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path))
    model = models["llama"]
    config = rome.ROMEConfig.for_model(model)
    assert config.prefix_seeds == rome.EASYEDIT_PREFIX_SEEDS
    prefixes = context_prefixes(model, config)
    assert len(prefixes) == 21 and prefixes[0] == ""
    seeds = [seed for _ in config.context_template_length_params for seed in config.prefix_seeds for _ in range(2)]
    rows = sample_context_prefixes(model, config)
    starts = [list(model.tokenizer(seed)["input_ids"][1:]) for seed in seeds]  # the seed's tokens, no BOS
    assert all(row[: len(start)] == start for row, start in zip(rows, starts, strict=True))
    bos = 1  # the LLaMA-style tokenizer adds <s>, which ROME's max_out_len counts; a longer seed is kept whole
    lengths = [5] * 10 + [10] * 10
    assert [len(r) + bos for r in rows] == [max(n, len(start) + bos) for n, start in zip(lengths, starts)]


def test_prefixes_are_cached_per_model_and_settings(models, tmp_path, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path))
    model = models["gpt2"]
    config = rome.ROMEConfig.for_model(model)
    first = context_prefixes(model, config)
    assert first == context_prefixes(model, config, cache=False)  # the cache holds what sampling gives
    monkeypatch.setattr(prefixes_module, "sample_context_prefixes", lambda *a: pytest.fail("sampled again"))
    assert context_prefixes(model, config) == first
    with pytest.raises(pytest.fail.Exception):  # another seed is another entry
        context_prefixes(model, dataclasses.replace(config, seed=7))


# ------------------------------------------------------------------------------------------- rank-one update


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_one_update_installs_v_star_and_spares_C_orthogonal_keys(models, covs, edits, arch):
    model, cov, edit = models[arch], covs[arch], edits[arch]
    W = W_out(model, LAYER).clone()
    c = cov.solve(edit.k_star).float()  # (d_mlp,) C⁻¹k*
    g = torch.Generator().manual_seed(0)
    random_keys = torch.randn(4, model.cfg.d_mlp, generator=g) * edit.k_star.norm() / model.cfg.d_mlp**0.5
    orthogonal = random_keys - ((random_keys @ c) / (edit.k_star @ c))[:, None] * edit.k_star  # kᵀC⁻¹k* = 0
    with rome.applied(model, edit):
        W_edited = W_out(model, LAYER).clone()
    scale = edit.v_star.norm()
    assert (W_edited @ edit.k_star - edit.v_star).norm() < 1e-5 * scale
    assert not torch.allclose(W @ edit.k_star, edit.v_star, rtol=1e-3, atol=1e-3)  # the edit did something
    change = (orthogonal @ W_edited.T - orthogonal @ W.T).norm(dim=1)  # (4,)
    reach = edit.residual.norm() * (random_keys @ edit.key_selector).abs()  # what non-orthogonal keys get
    assert torch.all(change < 1e-4 * edit.residual.norm()) and torch.all(reach > 1e-2 * edit.residual.norm())
    torch.testing.assert_close(W_edited - W, edit.delta_W, rtol=1e-4, atol=1e-6)


def test_rank_one_factors_match_dense_formula(models, covs, edits):
    model, cov, edit = models["llama"], covs["llama"], edits["llama"]
    W = W_out(model, LAYER).double().numpy()
    k_star, v_star = edit.k_star.double().numpy(), edit.v_star.double().numpy()
    C_inv = np.linalg.inv(cov.C_.numpy() + cov.ridge_ * np.eye(model.cfg.d_mlp))
    expected = np.outer(v_star - W @ k_star, C_inv @ k_star) / (k_star @ C_inv @ k_star)
    np.testing.assert_allclose(edit.delta_W.double().numpy(), expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    residual, selector = rome.rank_one_update(W_out(model, LAYER), edit.k_star, edit.v_star, cov)
    assert torch.equal(selector, edit.key_selector)
    torch.testing.assert_close(residual, edit.residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edit.strength(edit.k_star), torch.tensor(1.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(edit.key_selector @ edit.k_star, sim.edit_strength(edit.k_star, edit.k_star, cov).float())


#: kmeng01/rome's ``rewrite_module_tmp`` and ``mlp_module_tmp`` per HF model type: hparams/ROME/gpt2-xl.json, and
#: EasyEdit's hparams/ROME/llama-7b.yaml for LLaMA-family models (an ``nn.Linear`` ``down_proj``, not a ``Conv1D``).
_REFERENCE_MODULES = {"gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp"),
                      "llama": ("model.layers.{}.mlp.down_proj", "model.layers.{}.mlp")}


def _rome_reference(path, request: dict, layer: int, C_inv: torch.Tensor, prefixes, config,
                    stats: dict | None = None) -> torch.Tensor:
    """kmeng01/rome's ``execute_rome`` for one layer, transcribed plainly on the Hugging Face model and tokenizer
    (no keyscope code): ``rome_main.get_context_templates`` (given prefixes), ``compute_u``,
    ``compute_v`` and the update ``u ⊗ right_vector``, for GPT-2 and LLaMA-family models (:data:`_REFERENCE_MODULES`).
    Returns ``ΔW`` as ``(d_model, d_mlp)`` float64 for both. ``stats``, if given, receives the v* loop's ``steps``
    (forward evaluations), ``seconds`` and ``tokens_per_step`` (the padded batch, every position through every block).

    Tokenisers that prepend a BOS (LLaMA's): the subject's last token is found as EasyEdit's
    ``repr_tools.get_words_idxs_in_templates`` does (``len(tok.encode(prefix + word)) - 1``: kmeng01's lengths of
    the separately tokenised prefix and word would count the BOS twice), and the target drops its leading BOS as
    EasyEdit's ``compute_v`` does; otherwise kmeng01/rome's code as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    for param in hf.parameters():
        param.requires_grad_(False)
    rewrite_module, mlp_module = (name.format(layer) for name in _REFERENCE_MODULES[hf.config.model_type])
    mlp, rewrite = hf.get_submodule(mlp_module), hf.get_submodule(rewrite_module)
    subject, prompt = request["subject"], request["prompt"]
    target = request["target_new"] if request["target_new"].startswith(" ") else " " + request["target_new"]
    templates = ["{}"] + [prefix + ". {}" for prefix in prefixes if prefix]
    bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]

    def last_index(template: str) -> int:  # repr_tools.get_words_idxs_in_templates, subtoken "last"
        fill_idx = template.index("{}")
        before, word = template[:fill_idx], subject
        if bos:  # EasyEdit's repr_tools
            return len(tok.encode(before + word)) - 1
        if before:
            assert before[-1] == " "
            before, word = before[:-1], " " + subject.strip()
        return len(tok(before)["input_ids"]) + len(tok(word)["input_ids"]) - 1

    def module_io(text: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # repr_tools.get_repr_at_idxs
        seen = {}
        handle = rewrite.register_forward_hook(lambda m, i, o: seen.update(input=i[0], output=o))
        try:
            with torch.no_grad():
                hf(**tok([text], return_tensors="pt"))
        finally:
            handle.remove()
        return seen["input"][0, index].double(), seen["output"][0, index].double()

    # compute_u: u = C⁻¹ k̄ / ‖C⁻¹ k̄‖, k̄ the mean key over the context templates
    context_prompts = [t.format(prompt) for t in templates]
    k_bar = torch.stack([module_io(c.format(subject), last_index(c))[0] for c in context_prompts]).mean(0)
    u = C_inv @ k_bar
    u = u / u.norm()

    # compute_v
    target_ids = tok(target)["input_ids"]
    if bos and target_ids[:1] == [tok.bos_token_id]:  # EasyEdit's compute_v
        target_ids = target_ids[1:]
    rewriting = [c + tok.decode(target_ids[:-1]) for c in context_prompts]
    all_prompts = rewriting + ["{} is a"]
    inputs = tok([q.format(subject) for q in all_prompts], return_tensors="pt", padding=True)
    targets = torch.full((len(rewriting), inputs["input_ids"].shape[1]), -100)
    for i in range(len(rewriting)):
        ex_len = int(inputs["attention_mask"][i].sum())
        targets[i, ex_len - len(target_ids) : ex_len] = torch.tensor(target_ids)
    lookup = [last_index(q) for q in all_prompts]
    delta = torch.zeros(hf.config.hidden_size, requires_grad=True)
    state = {"target_init": None}

    def edit_output(module, args, out):
        if state["target_init"] is None:
            state["target_init"] = out[0, lookup[0]].detach().clone()
        out = out.clone()
        for i, idx in enumerate(lookup):
            out[i, idx, :] += delta
        return out

    opt = torch.optim.Adam([delta], lr=config.v_lr)
    kl_init = None
    handle = mlp.register_forward_hook(edit_output)
    start = time.perf_counter()
    try:
        for it in range(config.v_num_grad_steps):
            opt.zero_grad()
            logits = hf(**inputs).logits
            kl_log_probs = torch.log_softmax(logits[-1:, lookup[-1], :], dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[: len(rewriting)], dim=2)
            picked = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
            mask = (targets != -100).float()
            nll = (-(picked * mask).sum(1) / len(target_ids)).mean()
            kl = config.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True,
                                                                reduction="batchmean")
            weight_decay = config.v_weight_decay * (torch.norm(delta) / torch.norm(state["target_init"]) ** 2)
            loss = nll + kl + weight_decay
            if loss < 5e-2 or it == config.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = config.clamp_norm_factor * state["target_init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    if stats is not None:
        stats.update(steps=it + 1, seconds=time.perf_counter() - start, tokens_per_step=inputs["input_ids"].numel())
    v_target = state["target_init"].double() + delta.detach().double()
    cur_input, cur_output = module_io(prompt.format(subject), last_index(prompt))
    right_vector = (v_target - cur_output) / torch.dot(cur_input, u)
    return torch.outer(right_vector, u)  # (d_model, d_mlp): rome_main's (d_mlp, d_model) upd_matrix, transposed


@pytest.mark.parametrize("arch", ["gpt2", "llama-bpe"])
def test_reference_mode_matches_a_dense_transcription_of_rome(tiny_checkpoints, models, covs, llama_bpe, arch):
    """Reference mode against :func:`_rome_reference`, on GPT-2 and on LLaMA with SmolLM2's kind of tokenizer. (With
    the suite's sentencepiece LLaMA tokenizer the two differ by design, cosine ~0.998: compute_v's rewriting prompts
    end in ``tok.decode(target_ids[:-1])``, whose Metaspace decoding drops the target's leading space.)"""
    path, model, cov = llama_bpe if arch == "llama-bpe" else (tiny_checkpoints[arch], models[arch], covs[arch])
    prefixes = ("", "Toko Yasuda plays the guitar", "The Republic of Slovenia is a country")
    config = rome.ROMEConfig.for_model(model, reference=True, v_num_grad_steps=8)
    edit = rome.compute_edit(model, REQUEST, LAYER, cov, config, prefixes=prefixes)
    cov.cholesky()
    C_inv = torch.linalg.inv(cov.C_ + cov.ridge_ * torch.eye(model.cfg.d_mlp, dtype=torch.float64))
    request = {"prompt": REQUEST.template, "subject": REQUEST.subject, "target_new": REQUEST.target_new}
    expected = _rome_reference(path, request, LAYER, C_inv, prefixes, config)
    got = edit.delta_W.double()
    cosine = float((got * expected).sum() / (got.norm() * expected.norm()))
    assert cosine > 0.9999, cosine
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    # the reference tokenises as the plain HF tokenizer does (GPT-2's: no BOS) and installs v* at the bare prompt's key
    bare = collect_keys(model, [REQUEST.template], [REQUEST.subject], LAYER, prepend_bos=hf_prepends_bos(model))[0]
    torch.testing.assert_close(edit.k_star, bare)
    torch.testing.assert_close(edit.strength(edit.k_star), torch.tensor(1.0), rtol=1e-5, atol=0)
    default = rome.compute_edit(model, REQUEST, LAYER, cov, dataclasses.replace(config, reference=False),
                                prefixes=prefixes)
    assert not torch.allclose(default.delta_W, edit.delta_W, rtol=1e-2, atol=0)


# ------------------------------------------------------------------------------------------- applying


@pytest.mark.parametrize("arch", ARCHS)
def test_applied_nests_and_restores_bit_exactly(models, covs, edits, arch):
    model = models[arch]
    other = rome.compute_edit(model, OTHER, LAYER, covs[arch], prefixes=edits[arch].prefixes[:3])
    snapshot, logits = _params(model), _logits(model)
    with rome.applied(model, edits[arch]) as same:
        assert same is model
        outer_W = W_out(model, LAYER).clone()
        assert not _same_params(model, snapshot)
        with rome.applied(model, other):
            assert not torch.equal(W_out(model, LAYER), outer_W)
        assert torch.equal(W_out(model, LAYER), outer_W)
        with rome.applied(model, edits[arch], other):
            pass
        assert torch.equal(W_out(model, LAYER), outer_W)
    assert _same_params(model, snapshot)
    assert torch.equal(_logits(model), logits)


def test_applied_restores_on_exception(models, edits):
    model = models["gpt2"]
    snapshot, logits = _params(model), _logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with rome.applied(model, edits["gpt2"]):
            assert not torch.equal(_logits(model), logits)
            raise RuntimeError("boom")
    assert _same_params(model, snapshot)
    assert torch.equal(_logits(model), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_is_permanent_and_save_model_round_trips(tiny_checkpoints, edits, tmp_path, arch):
    model = load_model(str(tiny_checkpoints[arch]))  # a private copy: apply() is permanent
    W_before = W_out(model, LAYER).clone()
    rome.apply(model, edits[arch])
    torch.testing.assert_close(W_out(model, LAYER) - W_before, edits[arch].delta_W, rtol=1e-4, atol=1e-6)
    edited_logits = _logits(model)
    saved = save_model(model, tmp_path / "edited")
    reloaded = load_model(str(saved))
    assert torch.equal(W_out(reloaded, LAYER), W_out(model, LAYER))
    assert torch.equal(_logits(reloaded), edited_logits)
    assert all(torch.equal(a, b) for a, b in zip(hf_state_dict(model).values(), hf_state_dict(reloaded).values()))


def test_edit_that_does_not_fit_is_refused(models, edits):
    edit = dataclasses.replace(edits["gpt2"], layer=7)
    with pytest.raises(LayerOutOfRange):
        rome.apply(models["gpt2"], edit)
    with pytest.raises(ValueError, match="do not fit"):
        rome.apply(models["llama"], dataclasses.replace(edits["gpt2"], residual=torch.zeros(3)))


# ------------------------------------------------------------------------------------------- patch view


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_view_predicts_hooked_values(models, edits, arch):
    """Lemma 4.1 / Corollary 4.2: W'k + b = W k + b + s(k)(v* − W k*) for keys of perturbed prompts."""
    model, edit = models[arch], edits[arch]
    tokenizer = model.tokenizer
    template, subject = REQUEST.template, REQUEST.subject
    probes = [pt.Probe(template, subject)]
    probes += pt.rephrased_subjects(template, subject, ["Darrieux", "Danielle"])
    probes += pt.shuffled_subjects(tokenizer, template, subject, n=2, require_exact=False)
    probes.append(pt.long_context(tokenizer, template, subject, hf_tiny.TRAINING_TEXT[::-1], n_tokens=120))
    assert {p.kind for p in probes} == {"original", "rephrase", "shuffle", "long"}
    keys = sim.probe_keys(model, probes, LAYER)  # (n, d_mlp) before the edit
    W_before, b_before = W_out(model, LAYER).clone(), b_out(model, LAYER)
    b_before = None if b_before is None else b_before.clone()

    def hooked_values():
        values = []
        for probe in probes:
            encoded, index = locate(tokenizer, probe.template, probe.subject)
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.tensor([encoded.ids]), names_filter=value_hook(LAYER))
            values.append(cache[value_hook(LAYER)][0, index])
        return torch.stack(values)  # (n, d_model)

    unedited = hooked_values()
    with rome.applied(model, edit):
        edited = hooked_values()
    predicted = rome.predicted_value(edit, keys, W_before, b_before)  # (n, d_model)
    error = (predicted - edited).norm(dim=1) / edited.norm(dim=1)
    assert torch.all(error < 1e-4), error
    moved = (edited - unedited).norm(dim=1) / edited.norm(dim=1)
    assert moved[0] > 100 * 1e-4  # the original prompt's value really changed
    strengths = edit.strength(keys)
    torch.testing.assert_close(edited - unedited, strengths[:, None] * edit.residual[None], rtol=1e-3, atol=1e-4)


VARIANTS = {
    "plain": dict(reuse_lower_layers=False, sdpa=False),  # every step a full forward, δ hooked into the MLP output
    "replay": dict(reuse_lower_layers=True, reuse_prefix=False, sdpa=True),  # blocks 0..L replayed (SDPA: the GPU path)
    "fast": dict(reuse_lower_layers=True, sdpa=True),  # the default: replayed and only the suffix above L
}


def _v_star_every_way(model, request, layer, config, prefixes=None):
    """v* by each of :data:`VARIANTS`, with how often block 0's own module ran in each and the query lengths block
    ``layer + 1`` saw."""
    from keyscope.model.models import fast_logits_ok

    prefixes = context_prefixes(model, config) if prefixes is None else prefixes
    k_star = rome.compute_k_star(model, request, layer, prefixes)
    fast_logits_ok(model)  # its one-off check runs the model: before the counting
    runs, queries = [], []
    handles = [model.blocks[0].original_component.register_forward_hook(lambda *args: runs.append(1)),
               model.blocks[layer + 1].original_component.register_forward_pre_hook(
                   lambda module, args: queries.append(args[0].shape[1]))]
    try:
        results = {}
        for name, options in VARIANTS.items():
            runs.clear()
            queries.clear()
            v_star, trace = rome.compute_v_star(model, request, layer, k_star, prefixes, config, **options)
            results[name] = (v_star, trace, len(runs), list(queries))
    finally:
        for handle in handles:
            handle.remove()
    return results


def _assert_same_v_star(results, n_steps=None):
    plain, plain_trace, plain_runs, _ = results["plain"]
    assert plain_runs == len(plain_trace.loss)
    assert plain_trace.delta_norm > 1e-3 * plain_trace.value_norm  # δ moved: not a comparison of zero updates
    for name in ("replay", "fast"):
        v_star, trace, runs, _ = results[name]
        assert runs == 1  # block 0 ran once, not once per step
        assert len(trace.loss) == len(plain_trace.loss) == (n_steps or len(trace.loss))
        assert trace.stopped_early == plain_trace.stopped_early
        torch.testing.assert_close(v_star, plain, rtol=1e-4, atol=1e-5 * float(plain.norm()))
        np.testing.assert_allclose(trace.loss, plain_trace.loss, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_v_star_loop_runs_lower_layers_once_and_gives_the_same_v_star(models, arch):
    model = models[arch]
    config = dataclasses.replace(rome.ROMEConfig(), v_num_grad_steps=12, early_stop_loss=None)
    results = _v_star_every_way(model, REQUEST, LAYER, config)
    _assert_same_v_star(results, 12)
    assert not results["fast"][1].stopped_early
    assert all("forward" not in vars(block) for block in model.blocks)  # the replay is undone
    assert "forward" not in vars(model.blocks[0].attn)


def test_fast_v_star_loop_on_factworld_stops_at_the_same_step():
    from keyscope.data.datasets import load_facts

    model = load_model("factworld")
    fact = load_facts("factworld")[0]
    request = EditRequest(fact.prompt, fact.subject, fact.target_new)
    config = rome.ROMEConfig.for_model(model)
    results = _v_star_every_way(model, request, rome.default_layer(model), config)
    _assert_same_v_star(results)
    assert len(results["plain"][1].loss) > 1


#: Subjects at the start, inside and at the end of the prompt; a two-token target; different prefix lengths.
PREFIX_REQUESTS = (
    REQUEST,
    OTHER,
    EditRequest("The Republic of {} is a country in", "Slovenia", "Central Europe"),
)


@pytest.mark.parametrize("arch", ("llama", "mistral"))
def test_v_star_from_the_suffix_with_cached_prefix_equals_the_plain_loop(tiny_checkpoints, arch):
    model = load_model(str(tiny_checkpoints[arch]))
    config = dataclasses.replace(rome.ROMEConfig(), v_num_grad_steps=8, early_stop_loss=None)
    prefixes = ("", "The", "Michael Jordan played basketball for", "Apple A5 was created by Apple. Apple A5 runs")
    for request in PREFIX_REQUESTS:
        results = _v_star_every_way(model, request, LAYER, config, prefixes)
        _assert_same_v_star(results, 8)
        lengths = {name: queries for name, (*_, queries) in results.items()}
        full = lengths["plain"][0]
        assert lengths["plain"] == [full] * 8 and lengths["replay"] == [full] * 8
        # the fast loop: blocks 0..L once (stopping at block L + 1), one pass over the prefix columns, then every step
        # over the suffix columns only
        prefix, *suffix = lengths["fast"]
        assert suffix == [suffix[0]] * 8 and prefix + suffix[0] >= full > suffix[0]  # P + S ≥ the padded length


@pytest.mark.parametrize("arch", ("gpt2", "llama", "mistral"))
def test_prefix_cached_logits_equal_a_full_forward_on_a_padded_batch(tiny_checkpoints, arch):
    """The logits of :class:`PrefixCached` at a random δ against a full forward with δ hooked into the MLP
    output, on the right-padded v* batch of prompts of different lengths."""
    from keyscope.model.models import fast_logits_ok, logits_at, sdpa_attention

    model = load_model(str(tiny_checkpoints[arch]))
    assert fast_logits_ok(model)  # (its one-off check runs the model: before the hooks)
    config = rome.ROMEConfig()
    prefixes = ("", "The", "Michael Jordan played basketball for the Chicago Bulls.")
    batch = v_star_batch(model, OTHER, prefixes, config)
    assert not batch.attention_mask.all()  # padded
    rows = torch.cat([batch.target_rows, torch.tensor([batch.n_prompts])])
    positions = torch.cat([batch.target_positions, torch.tensor([batch.kl_position])])
    delta = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))  # (d_model,)
    with torch.no_grad(), model.hooks(fwd_hooks=[(value_hook(LAYER), lambda a, hook: a + batch.inject * delta)]):
        full = logits_at(model, batch.input_ids, batch.attention_mask, rows, positions)  # (n, vocab)
    with torch.no_grad(), sdpa_attention(model):
        cached = PrefixCached(model, LAYER, batch, rows, positions)(delta)  # (n, vocab)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()))


def test_a_batch_longer_than_the_sliding_window_runs_the_replay(tiny_checkpoints, monkeypatch):
    model = load_model(str(tiny_checkpoints["mistral"]))
    monkeypatch.setattr(model.original_model.config, "sliding_window", 4)  # shorter than any v* batch
    config = dataclasses.replace(rome.ROMEConfig(), v_num_grad_steps=3, early_stop_loss=None)
    results = _v_star_every_way(model, REQUEST, LAYER, config, ("", "The"))
    assert results["fast"][3] == results["replay"][3] == results["plain"][3]  # every step over the whole batch
