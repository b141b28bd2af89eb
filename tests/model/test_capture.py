"""keyscope.model.capture: the one capture primitive, on tiny random checkpoints of every supported architecture.

Checked: captured activations equal ``run_with_cache``'s bit for bit (stopped or not, with a mask, with a
``keep``); ``stop=True`` runs no hook point after the last site; the hooks are gone after the block, whether it
ends normally, by the stop or by an exception; an unknown site is a one-line error; and no module of the
package outside :mod:`keyscope.model.capture` hooks the model to read an activation (the interventions that change
one are listed with their reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from keyscope.data.prompts import pad_batch
from keyscope.model import capture as cap
from keyscope.model.models import (
    FINAL_RESIDUAL_HOOK,
    attention_norm_scale_hook,
    attention_pattern_hook,
    attn_out_hook,
    embed_hook,
    final_norm_scale_hook,
    key_hook,
    load_model,
    residual_hook,
    value_hook,
)
from tests import hf_tiny

PACKAGE = Path(__file__).resolve().parents[2] / "keyscope"
LAYER = 1


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {arch: load_model(str(path)) for arch, path in tiny_checkpoints.items()}


def _batch(model):
    """Two right-padded rows of different lengths: ids and mask ``(2, pos)``."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, int(model.cfg.d_vocab), (n,), generator=generator).tolist() for n in (9, 6)]
    return pad_batch(rows, 0, "right", device=model.cfg.device)


def _sites(model) -> list[str]:
    last = int(model.cfg.n_layers) - 1
    return [embed_hook(), key_hook(0), key_hook(LAYER), value_hook(LAYER), attn_out_hook(LAYER), residual_hook(LAYER),
            attention_pattern_hook(last), attention_norm_scale_hook(last), final_norm_scale_hook(), FINAL_RESIDUAL_HOOK]


def _fired(model, ids, mask, sites, *, stop: bool) -> list[str]:
    """The hook points that fired, in order, in one forward pass with ``sites`` captured (``stop`` as given)."""
    fired: list[str] = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: True, lambda t, hook: fired.append(hook.name))]):
        with cap.capture(model, sites, stop=stop):
            model(ids, attention_mask=mask)
    return fired


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_captures_equal_run_with_cache_exactly(models, arch):
    model = models[arch]
    ids, mask = _batch(model)
    names = _sites(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
        stopped = cap.run_to(model, ids, names, mask)
        with cap.capture(model, names) as kept:
            full = model(ids, attention_mask=mask)
        block_sites = [key_hook(0), residual_hook(LAYER), key_hook(LAYER)]
        early = cap.run_to(model, ids, block_sites, mask)  # stop_at_layer as well as the capture's stop
    assert torch.equal(full, logits)
    for name in names:
        for got in (stopped[name], kept[name]):
            assert got.dtype == cache[name].dtype and torch.equal(got, cache[name]), name
    for name in block_sites:
        assert torch.equal(early[name], cache[name]), name


def test_keep_is_applied_at_capture_time(models):
    model = models["gpt2"]
    ids, mask = _batch(model)
    rows, positions = torch.tensor([0, 1, 1]), torch.tensor([8, 0, 5])
    with torch.no_grad():
        whole = cap.run_to(model, ids, [key_hook(LAYER)], mask)[key_hook(LAYER)]  # (2, pos, d_mlp)
        site = cap.Site(key_hook(LAYER), lambda a: a[rows, positions])
        picked = cap.run_to(model, ids, [site], mask)[site.name]  # (3, d_mlp)
    assert picked.shape == (3, model.cfg.d_mlp) and torch.equal(picked, whole[rows, positions])
    # the activation is passed as the forward made it: attached to the graph when gradients are on
    with torch.enable_grad():
        model.W_E.requires_grad_(True)
        try:
            attached = cap.run_to(model, ids, [site], mask)[site.name]
        finally:
            model.W_E.requires_grad_(False)
    assert attached.requires_grad


@pytest.mark.filterwarnings("ignore:hooks. skipped")  # the hook-everything filter meets gated-off hook points
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stop_runs_nothing_after_the_last_site(models, arch):
    model = models[arch]
    ids, mask = _batch(model)
    sites = [key_hook(0), residual_hook(0), key_hook(LAYER)]  # the last to fire is the layer-1 key
    everything = _fired(model, ids, mask, sites, stop=False)
    stopped = _fired(model, ids, mask, sites, stop=True)
    last = model.hook_dict[key_hook(LAYER)].name  # the hook point's own name (key_hook's may be an alias)
    assert stopped == everything[: everything.index(last) + 1] and len(stopped) < len(everything)
    assert not any(name.startswith(f"blocks.{LAYER + 1}.") or name.startswith("ln_final") for name in stopped)
    # the order the sites are listed in does not matter: the pass stops when all of them have fired
    assert _fired(model, ids, mask, sites[::-1], stop=True) == stopped
    # the final residual stops before the unembedding: no full logits are computed
    with torch.no_grad():
        assert cap.run_to(model, ids, [FINAL_RESIDUAL_HOOK], mask)[FINAL_RESIDUAL_HOOK].shape == (*ids.shape, model.cfg.d_model)


def test_hooks_are_removed_on_every_exit(models):
    model = models["gpt2"]
    ids, mask = _batch(model)
    with torch.no_grad():
        with cap.capture(model, [key_hook(LAYER)]) as kept:
            model(ids, attention_mask=mask)
        assert key_hook(LAYER) in kept
        kept.clear()
        model(ids, attention_mask=mask)
        assert kept == {}  # normal exit

        with pytest.raises(ZeroDivisionError):
            with cap.capture(model, [key_hook(LAYER)]) as kept:
                model(ids, attention_mask=mask)
                1 / 0  # noqa: B018 - the caller's body fails
        kept.clear()
        model(ids, attention_mask=mask)
        assert kept == {}  # exception in the body

        with cap.capture(model, [key_hook(0)], stop=True) as kept:
            model(ids, attention_mask=mask)
            raise AssertionError("the stop ends the block")
        kept.clear()
        model(ids, attention_mask=mask)
        assert kept == {}  # the stop

        with cap.module_output(model.blocks[LAYER]) as recorded:
            model(ids, attention_mask=mask)
        assert "output" in recorded
        recorded.clear()
        model(ids, attention_mask=mask)
        assert recorded == {}
        assert not model.blocks[LAYER]._forward_hooks


def test_a_nested_capture_does_not_swallow_another_stop(models):
    model = models["gpt2"]
    ids, mask = _batch(model)
    with torch.no_grad():
        with cap.capture(model, [key_hook(LAYER)], stop=True) as outer:
            with cap.capture(model, [key_hook(0)]) as inner:  # no stop: the outer capture's stop must pass through
                model(ids, attention_mask=mask)
            raise AssertionError("the outer stop ends both blocks")
    assert key_hook(0) in inner and key_hook(LAYER) in outer


def test_unknown_or_repeated_sites_are_clear_errors(models):
    model = models["gpt2"]
    ids, mask = _batch(model)
    with pytest.raises(cap.UnknownSite, match=r"'blocks.1.mlp.hook_pots' is not a hook point .*blocks.1.mlp.hook_post"):
        cap.run_to(model, ids, ["blocks.1.mlp.hook_pots"], mask)
    with pytest.raises(ValueError, match="given twice"):
        cap.run_to(model, ids, [key_hook(0), cap.Site(key_hook(0))], mask)
    with pytest.raises(ValueError, match="at least one"):
        cap.run_to(model, ids, [], mask)


def test_last_block_bounds_only_block_sites():
    assert cap.last_block(cap.sites_of(["blocks.0.mlp.hook_post", "blocks.11.hook_resid_post"])) == 11
    assert cap.last_block(cap.sites_of(["blocks.0.mlp.hook_post", "ln_final.hook_in"])) is None


# ---------------------------------------------------------------------------------------------- one capture primitive

#: Calls that put a hook on the model (or read it through TransformerLens' cache).
HOOKING = {"hooks", "run_with_cache", "run_with_hooks", "add_hook", "register_forward_hook",
           "register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook"}

#: The hooks outside keyscope/model/capture.py, by (module, enclosing function): none reads an activation.
ALLOWED = {
    ("keyscope/editing/optimise.py", "optimise_delta"): "adds ROME's δ to the value or residual (an intervention)",
    ("keyscope/editing/rep.py", "adapted"): "replaces every key by REP's adapted key k̂ (an intervention)",
    ("keyscope/editing/rep.py", "recorded_gates"): "a pre-hook on keyscope's own KeyAdaptor modules, not on the model: "
                                           "records the adaptor's gate decisions",
    ("keyscope/analysis/trace.py", "_probabilities_once"): "corrupts the embeddings and restores clean states (interventions)",
}


def hooking_calls(package: Path) -> set[tuple[str, str]]:
    """``(module path, qualified name of the outermost function around it)`` of every hooking call (:data:`HOOKING`)
    in the package (``<module>`` at module level)."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package.parent))

        def visit(node, scope: tuple[str, ...], in_function: bool, module=module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr in HOOKING:
                    found.add((module, ".".join(scope) or "<module>"))
                if not in_function and isinstance(child, ast.ClassDef):
                    visit(child, (*scope, child.name), False)
                elif not in_function and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, (*scope, child.name), True)
                else:
                    visit(child, scope, in_function)

        visit(ast.parse(path.read_text()), (), False)
    return found


def test_no_module_but_capture_hooks_the_model_to_read_activations():
    calls = hooking_calls(PACKAGE)
    outside = {call for call in calls if call[0] != "keyscope/model/capture.py"}
    assert outside <= set(ALLOWED), f"hooks outside keyscope/model/capture.py: {sorted(outside - set(ALLOWED))}"
    assert set(ALLOWED) <= outside, f"stale allow-list entries: {sorted(set(ALLOWED) - outside)}"
    assert {call for call in calls if call[0] == "keyscope/model/capture.py"}


def test_the_grep_sees_a_new_capture(tmp_path):
    package = tmp_path / "keyscope"
    package.mkdir()
    (package / "new.py").write_text("class Reader:\n    def read(self, model):\n        def inner():\n"
                                    "            return model.run_with_cache(1)\n        return inner()\n"
                                    "HANDLE = object().register_forward_hook(print)\n")
    assert hooking_calls(package) == {("keyscope/new.py", "Reader.read"), ("keyscope/new.py", "<module>")}
