"""keyscope.model.models on tiny random checkpoints of every supported architecture.

The contract checked here is the one every editing method relies on: for each block ``L``

* ``key = hook_post`` is exactly the tensor the HF down-projection module receives,
* ``value = hook_out = W_out @ key + b_out`` with ``W_out`` the ``(d_model, d_mlp)`` view,
* writing into that view edits the model, and writing the old weights back restores it bit for bit,

plus the one-line errors of :func:`keyscope.model.models.load_model`, the default edit layer, and what
``stop_at_layer`` really skips.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch

import keyscope.factworld
from keyscope._infra.errors import KeyscopeError, LayerOutOfRange, ModelNotAvailable
from keyscope.data.prompts import encode, pad_batch
from keyscope.model import models
from tests import hf_tiny

ARCHS = hf_tiny.ARCHITECTURES
PROMPTS = ["The Eiffel Tower is located in Paris", "Michael Jordan played"]

#: Where each family's HF down-projection lives in the HF module tree (``{L}`` is the block index).
HF_DOWN_PROJECTION = {
    "gpt2": "transformer.h.{L}.mlp.c_proj",
    "llama": "model.layers.{L}.mlp.down_proj",
    "mistral": "model.layers.{L}.mlp.down_proj",
    "gpt_neox": "gpt_neox.layers.{L}.mlp.dense_4h_to_h",
    "gptj": "transformer.h.{L}.mlp.fc_out",
}

#: ``round(fraction * 3)`` for the 3-block tiny models, from FAMILY_DEPTH_FRACTION.
TINY_DEFAULT_LAYER = {"gpt2": 1, "llama": 0, "mistral": 0, "gpt_neox": 1, "gptj": 1}


@pytest.fixture(scope="module")
def bridges(tiny_checkpoints):
    """Each tiny checkpoint loaded once through ``load_model``: {arch: TransformerBridge}."""
    return {arch: models.load_model(str(tiny_checkpoints[arch]), device="cpu") for arch in ARCHS}


def hf_down_projection(model, arch: str, layer: int) -> torch.nn.Module:
    """The down-projection reached by its HF attribute path, unwrapped from the bridge's wrappers."""
    module = model.original_model
    for part in HF_DOWN_PROJECTION[arch].format(L=layer).split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    while hasattr(module, "original_component"):  # the bridge swaps a LinearBridge into the HF tree
        module = module.original_component
    return module


def assert_one_line(exc_info, *fragments: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and online mode; the test points the endpoint where it likes."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


def put_in_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """Lay ``checkpoint`` out in ``cache`` the way ``huggingface_hub`` stores a download of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


# --- the key / value / W_out contract --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_key_hook_is_the_input_of_the_hf_down_projection(bridges, arch):
    model = bridges[arch]
    tokens = model.to_tokens(PROMPTS)  # (batch, pos), right-padded
    received: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(models.n_layers(model)):
        module = models.down_projection(model, layer)
        assert module is hf_down_projection(model, arch, layer)
        assert type(module).__name__ == ("Conv1D" if arch == "gpt2" else "Linear")

        def grab(_module, args, layer=layer):
            received[layer] = args[0].detach().clone()  # (batch, pos, d_mlp)

        handles.append(module.register_forward_pre_hook(grab))
    try:
        names = [models.key_hook(layer) for layer in range(models.n_layers(model))]
        _, cache = model.run_with_cache(tokens, names_filter=names)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(models.n_layers(model)):
        key = cache[models.key_hook(layer)]  # (batch, pos, d_mlp)
        assert key.shape == (*tokens.shape, models.d_mlp(model))
        assert torch.equal(key, received[layer])


@pytest.mark.parametrize("arch", ARCHS)
def test_value_is_W_out_key_plus_bias(bridges, arch):
    model = bridges[arch]
    tokens = model.to_tokens(PROMPTS)  # (batch, pos)
    n = models.n_layers(model)
    names = [models.key_hook(layer) for layer in range(n)] + [models.value_hook(layer) for layer in range(n)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for layer in range(n):
        key = cache[models.key_hook(layer)]  # (batch, pos, d_mlp)
        value = cache[models.value_hook(layer)]  # (batch, pos, d_model)
        W = models.W_out(model, layer)  # (d_model, d_mlp)
        b = models.b_out(model, layer)  # (d_model,) or None
        assert W.shape == (models.d_model(model), models.d_mlp(model))
        assert (b is None) == (arch in ("llama", "mistral"))
        predicted = torch.einsum("dm,bpm->bpd", W, key) + (0 if b is None else b)  # (batch, pos, d_model)
        torch.testing.assert_close(value, predicted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_one_write_through_W_out_edits_the_model_and_restores_bit_exactly(bridges, arch):
    model = bridges[arch]
    layer = 1
    tokens = model.to_tokens(PROMPTS)  # (batch, pos)
    names = [models.key_hook(layer), models.value_hook(layer)]
    logits_before, cache = model.run_with_cache(tokens, names_filter=names)  # (batch, pos, d_vocab)
    key = cache[models.key_hook(layer)]  # (batch, pos, d_mlp)

    W = models.W_out(model, layer)  # (d_model, d_mlp), a view of the parameter
    old = W.clone()
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(models.d_model(model), generator=generator)  # (d_model,)
    k_star = key[0, -1] / key[0, -1].norm()  # (d_mlp,)
    try:
        W.add_(torch.outer(u, k_star))  # W <- W + u k*^T, in place and outside no_grad
        parameter = models.down_projection(model, layer).weight
        stored = parameter.T if arch == "gpt2" else parameter  # (d_model, d_mlp)
        torch.testing.assert_close(stored.detach(), old + torch.outer(u, k_star), rtol=0, atol=0)

        logits_after, cache_after = model.run_with_cache(tokens, names_filter=names)
        assert torch.equal(cache_after[models.key_hook(layer)], key)  # the key is upstream of W_out
        W_new = models.W_out(model, layer)  # (d_model, d_mlp)
        b = models.b_out(model, layer)
        predicted = torch.einsum("dm,bpm->bpd", W_new, key) + (0 if b is None else b)  # (batch, pos, d_model)
        torch.testing.assert_close(cache_after[models.value_hook(layer)], predicted, rtol=1e-5, atol=1e-5)
        shift = cache_after[models.value_hook(layer)] - cache[models.value_hook(layer)]  # (batch, pos, d_model)
        torch.testing.assert_close(shift, torch.einsum("d,bp->bpd", u, key @ k_star), rtol=1e-4, atol=1e-4)
        assert not torch.equal(logits_after, logits_before)
    finally:
        W.copy_(old)
    assert torch.equal(model(tokens), logits_before)


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_bridge_describes_its_model(bridges, arch, tiny_checkpoints):
    model = bridges[arch]
    assert not model.training
    assert models.family(model) == arch
    assert (models.n_layers(model), models.d_model(model), models.d_mlp(model)) == (3, 64, 128)
    assert models.model_name(model) == str(tiny_checkpoints[arch])
    assert models.model_dir(model) == Path(tiny_checkpoints[arch]).resolve()
    assert models.key_hook(2) in model.hook_dict and models.value_hook(2) in model.hook_dict


# --- layers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 3, "3", 1.0, True, None])
def test_layer_out_of_range(bridges, bad):
    model = bridges["gpt2"]
    for use in (models.check_layer, models.down_projection, models.W_out, models.b_out):
        with pytest.raises(LayerOutOfRange) as exc_info:
            use(model, bad)
        assert_one_line(exc_info, "0..2")
    assert isinstance(exc_info.value, KeyscopeError)


def test_check_layer_accepts_integer_like_indices(bridges):
    model = bridges["gpt2"]
    assert models.check_layer(model, 2) == 2
    assert models.check_layer(model, torch.tensor(1)) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_default_layer_from_family_fraction(bridges, arch):
    assert models.default_layer(bridges[arch]) == TINY_DEFAULT_LAYER[arch]


def test_default_layer_from_model_card_overrides(tmp_path, tiny_checkpoints):
    directory = tmp_path / "carded"
    shutil.copytree(tiny_checkpoints["llama"], directory)
    (directory / models.MODEL_CARD).write_text(json.dumps({"default_layer": 2}))
    model = models.load_model(str(directory), device="cpu")
    assert models.model_card(model) == {"default_layer": 2}
    assert models.default_layer(model) == 2

    (directory / models.MODEL_CARD).write_text(json.dumps({"default_layer": 7}))
    assert models.default_layer(model) == 2  # the card is read once, at load
    with pytest.raises(LayerOutOfRange):
        models.default_layer(models.load_model(str(directory), device="cpu"))
    (directory / models.MODEL_CARD).write_text("{not json")
    with pytest.raises(ModelNotAvailable) as exc_info:  # a corrupt card is caught at load
        models.load_model(str(directory), device="cpu")
    assert_one_line(exc_info, "keyscope.json")
    models.register_source(model, replace(models.model_source(model), card=None))  # a card not read at load is read when asked
    with pytest.raises(ModelNotAvailable):
        models.model_card(model)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("gpt2-xl", 17),
        ("openai-community/gpt2-medium", 8),
        ("EleutherAI/gpt-j-6B", 5),
        ("meta-llama/Llama-2-7b-hf", 5),
        ("mistralai/Mistral-7B-v0.1", 5),
        ("/data/models/gpt2-xl", 17),  # a local copy is found by its directory name
        ("/data/models/llama-2-7b-hf/", 5),
        ("gpt2", None),
        ("someone/tiny-llama", None),
    ],
)
def test_published_layer_table(name, layer):
    assert models._published_layer(name) == layer


@pytest.mark.parametrize(
    ("family", "depth", "published"),
    [("gpt2", 24, 8), ("gpt2", 36, 12), ("gptj", 28, 5), ("gpt_neox", 44, 15), ("llama", 32, 5), ("mistral", 32, 5)],
)
def test_family_fraction_reproduces_published_layers(family, depth, published):
    assert round(models.FAMILY_DEPTH_FRACTION[family] * depth) == published


def test_default_layer_of_a_published_hub_name_cached_under_its_redirect(hub, monkeypatch, tmp_path):
    """``gpt2-medium`` (here a tiny 9-block stand-in) cached as ``openai-community/gpt2-medium`` edits layer 8."""
    checkpoint = hf_tiny.save_tiny_checkpoint("gpt2", tmp_path / "medium", n_layers=9, d_model=32, d_mlp=64)
    put_in_cache(hub, "openai-community/gpt2-medium", checkpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = models.load_model("gpt2-medium", device="cpu")
    assert models.model_source(model).repo_id == "openai-community/gpt2-medium"
    assert models.default_layer(model) == 8


def test_transformer_lens_alias_finds_the_official_name(hub, monkeypatch, tmp_path):
    """``gpt-j`` is TransformerLens's alias of ``EleutherAI/gpt-j-6B`` (here a tiny 6-block stand-in)."""
    checkpoint = hf_tiny.save_tiny_checkpoint("gptj", tmp_path / "gptj", n_layers=6, d_model=32, d_mlp=64)
    put_in_cache(hub, "EleutherAI/gpt-j-6B", checkpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = models.load_model("gpt-j", device="cpu")
    assert (models.model_name(model), models.model_source(model).repo_id) == ("gpt-j", "EleutherAI/gpt-j-6B")
    assert models.default_layer(model) == 5


# --- where models come from, and the one-line errors -----------------------------------------------------


def test_cached_hub_name_loads_without_network(hub, monkeypatch, tiny_checkpoints):
    snapshot = put_in_cache(hub, "tiny-org/tiny-llama", tiny_checkpoints["llama"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = models.load_model("tiny-org/tiny-llama", device="cpu")
    assert models.model_name(model) == "tiny-org/tiny-llama"
    assert models.model_dir(model) == snapshot
    assert models.model_source(model).repo_id == "tiny-org/tiny-llama"
    assert models.family(model) == "llama"


def test_unknown_hub_name_offline_fails_fast_with_one_line(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 3
    assert_one_line(exc_info, "'no-such-org/no-such-model'", "HF_HUB_OFFLINE", "local Hugging Face model directory")


def test_unknown_hub_name_with_unreachable_hub_fails_fast_with_one_line(hub, monkeypatch):
    """Online mode, but the hub accepts connections and never answers: one probe, then the error.

    The bound is the probe's timeout plus the 3 s ``huggingface_hub`` may spend on its first request of the
    process (an agent-registry fetch), far below the ~25 s of retries ``from_pretrained`` would take.
    """
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshakes; nobody ever replies
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.5)
    try:
        start = time.perf_counter()
        with pytest.raises(ModelNotAvailable) as exc_info:
            models.load_model("no-such-org/no-such-model")
        assert time.perf_counter() - start < 8
    finally:
        silent.close()
    assert_one_line(exc_info, "'no-such-org/no-such-model'", "cannot be reached", "local Hugging Face model directory")


@pytest.fixture
def fake_hub(hub, monkeypatch):
    """A local stand-in for the hub API: ``/api/models/<repo>`` answers from ``fake_hub`` ({repo: json}),
    404 ``RepoNotFound`` otherwise (as the real hub does for missing and private repos)."""
    repos: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # the name http.server calls
            repo = self.path.split("?")[0].removeprefix("/api/models/")
            body, status = (json.dumps(repos[repo]), 200) if repo in repos else ("{}", 404)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if status == 404:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield repos
    server.shutdown()
    server.server_close()


def test_misspelt_hub_name_online_fails_with_one_line(fake_hub):
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model("gpt2-xxl")
    assert_one_line(exc_info, "no model 'gpt2-xxl' on the Hugging Face hub", "check the spelling")


def test_gated_hub_name_without_login_fails_with_one_line(fake_hub, monkeypatch):
    fake_hub["meta-llama/Llama-2-7b-hf"] = {"id": "meta-llama/Llama-2-7b-hf", "gated": "manual", "private": False}
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model("meta-llama/Llama-2-7b-hf")
    assert_one_line(exc_info, "'meta-llama/Llama-2-7b-hf' is gated", "hf auth login")


def test_invalid_hub_name(hub):
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model("not a model name!")
    assert_one_line(exc_info, "neither a local directory nor a valid Hugging Face model name")


@pytest.mark.parametrize("missing", ["absolute", "./relative/no-such-model"])
def test_nonexistent_directory(tmp_path, missing):
    path = str(tmp_path / "no-such-model") if missing == "absolute" else missing
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(path)
    assert_one_line(exc_info, path, "does not exist")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path))
    assert_one_line(exc_info, str(tmp_path), "no config.json")


def test_directory_without_weights(tmp_path, tiny_checkpoints):
    shutil.copy(tiny_checkpoints["gpt2"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path), device="cpu")
    assert_one_line(exc_info, str(tmp_path))


def test_config_with_a_badly_typed_field(tmp_path, tiny_checkpoints):
    config = json.loads((tiny_checkpoints["gpt2"] / "config.json").read_text())
    shutil.copytree(tiny_checkpoints["gpt2"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_embd": "not a number"}))
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path / "m"), device="cpu")
    assert_one_line(exc_info, str(tmp_path / "m"))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-type", "architectures": ["FooLM"]}))
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path), device="cpu")
    assert_one_line(exc_info, str(tmp_path))


def test_architecture_transformer_lens_does_not_support(tmp_path):
    from transformers import BioGptConfig

    config = BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["BioGptForCausalLM"]  # as in a checkpoint saved from the model
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path), device="cpu")
    assert_one_line(exc_info, "BioGptForCausalLM", "not supported by TransformerLens")


def test_mixture_of_experts_has_no_down_projection_to_edit(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    tokenizer = hf_tiny.sentencepiece_style_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model(str(tmp_path), device="cpu")
    assert_one_line(exc_info, "MixtralForCausalLM", "no dense MLP down-projection")


def test_missing_factworld_model(monkeypatch, tmp_path):
    monkeypatch.setattr(keyscope.factworld, "shipped_model_dir", lambda: tmp_path / "factworld" / "model")
    with pytest.raises(ModelNotAvailable) as exc_info:
        models.load_model()
    assert_one_line(exc_info, "factworld")


# --- stop_at_layer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_at_layer_skips_every_later_block(bridges, arch):
    """``model(tokens, stop_at_layer=L + 1)`` runs blocks ``0..L`` only and returns block L's residual output.

    Blocks after ``L`` run neither their hooks nor their HF modules. For the last block, ``stop_at_layer =
    n_layers`` stops nothing: the full forward runs and logits come back (see the next test).
    """
    model = bridges[arch]
    tokens = model.to_tokens(PROMPTS)  # (batch, pos)
    n = models.n_layers(model)
    _, full = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.hook_resid_post" for layer in range(n)])
    for layer in range(n - 1):
        hooks_fired: list[int] = []
        hf_fired: list[int] = []
        handles = [
            models.down_projection(model, later).register_forward_hook(
                lambda *_, later=later, fired=hf_fired: fired.append(later)
            )
            for later in range(n)
        ]
        fwd_hooks = [
            (models.key_hook(later), lambda act, hook, later=later, fired=hooks_fired: fired.append(later))
            for later in range(n)
        ]
        try:
            residual = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=layer + 1)
        finally:
            for handle in handles:
                handle.remove()
        assert hooks_fired == hf_fired == list(range(layer + 1))
        assert residual.shape == (*tokens.shape, models.d_model(model))  # (batch, pos, d_model)
        torch.testing.assert_close(residual, full[f"blocks.{layer}.hook_resid_post"], rtol=0, atol=0)


def test_stop_at_the_number_of_layers_runs_everything(bridges):
    model = bridges["llama"]
    tokens = model.to_tokens(PROMPTS)  # (batch, pos)
    out = model(tokens, stop_at_layer=models.n_layers(model))  # (batch, pos, d_vocab)
    assert torch.equal(out, model(tokens))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_at_selected_positions_equal_full_logits(tiny_checkpoints, arch):
    model = models.load_model(str(tiny_checkpoints[arch]))
    assert models.fast_logits_ok(model)  # the shortcut is used on these architectures
    texts = ["The actress Danielle Darrieux", "Kobe Bryant played for the Los Angeles Lakers."]
    ids, mask = pad_batch([encode(model.tokenizer, t).ids for t in texts], 0, "right")
    rows, positions = torch.tensor([0, 0, 1, 1]), torch.tensor([1, int(mask[0].sum()) - 1, 0, int(mask[1].sum()) - 1])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)[rows, positions]  # (4, vocab)
        selected = models.logits_at(model, ids, mask, rows, positions)  # (4, vocab)
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_attention_gives_the_eager_keys_and_logits_and_restores_the_bridge(bridges, arch):
    from keyscope.analysis.keys import layer_keys
    from keyscope.data.prompts import pad_batch

    model = bridges[arch]
    ids, mask = pad_batch([list(range(5, 29)), list(range(7, 15))], 0, "left")  # padding inside the batch
    last = models.n_layers(model) - 1
    eager_keys = layer_keys(model, ids, mask, last)  # (batch, pos, d_mlp)
    with torch.no_grad():
        eager_logits = model(ids, attention_mask=mask)  # (batch, pos, vocab)
    pattern_name = models.attention_pattern_hook(last)
    with models.sdpa_attention(model) as active:
        assert active
        fired = []
        with model.hooks(fwd_hooks=[(pattern_name, lambda t, hook: fired.append(1))]):
            keys = layer_keys(model, ids, mask, last)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask)
    assert not fired  # the fused kernel computes no pattern
    real = mask.bool()
    assert not torch.isnan(keys).any() and not torch.equal(keys[real], eager_keys[real])  # another kernel ran
    torch.testing.assert_close(keys[real], eager_keys[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[real], eager_logits[real], rtol=1e-4, atol=1e-4)
    # restored: the eager path and its pattern hook are back, bit for bit
    assert model.original_model.config._attn_implementation == "eager"
    assert "forward" not in vars(model.blocks[0].attn)
    with model.hooks(fwd_hooks=[(pattern_name, lambda t, hook: fired.append(1))]):
        assert torch.equal(layer_keys(model, ids, mask, last), eager_keys)
    assert fired


def test_default_dtype_is_bf16_only_for_real_models_on_cuda(tmp_path):
    shipped = models.resolve_model_path(models.FACTWORLD)
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert models.default_dtype("gpt2-xl", device) == torch.bfloat16
        assert models.default_dtype(str(tmp_path), device) == torch.bfloat16  # a local HF directory
        assert models.default_dtype(models.FACTWORLD, device) == torch.float32
        assert models.default_dtype(shipped, device) == torch.float32  # factworld by its path
    for name in ("gpt2-xl", str(tmp_path), models.FACTWORLD):
        assert models.default_dtype(name, "cpu") == torch.float32  # CPU results never change
