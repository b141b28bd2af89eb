"""Capture: the one way keyscope reads activations out of a forward pass.

Every reader of activations — the keys of :mod:`keyscope.analysis.keys`, the covariance's streamed keys
(:func:`keyscope.analysis.covariance.add_batch`), the scan's keys at several layers, MEMIT's residuals, the reach check's
keys, the fast logits' final residual (:func:`keyscope.model.models.logits_at`), the clean states of causal tracing and
the lemma checks of :mod:`keyscope.evaluation.bounds` — names its **sites**, TransformerLens hook points
(:func:`keyscope.model.models.key_hook` and its siblings), and gets their activations back from this module. No other
module registers a hook to read an activation (``tests/model/test_capture.py`` greps for it); the hooks that *change*
an activation (ROME's δ, REP's adapted keys, tracing's corruption and restoration) are interventions and stay
with their methods.

The design is that of baukit's ``Trace``/``TraceDict`` (davidbau/baukit, ``baukit/nethook.py``: ``Trace`` l. 19,
its ``stop=True`` raising ``StopForward`` after the layer l. 92-93 and swallowing it in ``__exit__`` l. 102-105;
``TraceDict`` l. 111, stopping after the last listed layer l. 124-126 and 157-167; ``StopForward`` l. 183) on
TransformerLens' hook context (``HookedRootModule.hooks``, ``transformer_lens/HookedRootModule.py`` l. 245;
the bridge's ``BridgeCore.hooks``, ``transformer_lens/model_bridge/bridge_core.py`` l. 1152, TransformerLens
4.3): sites in, activations out, the forward stopped once every site has fired, the hooks removed however the
block ends.

* :func:`capture` — a context manager for callers that run their own forward pass (and need its logits, or run
  it with an edit applied): yields a dict ``{site name: kept activation}`` filled during each forward inside.
  With ``stop=True`` the hook of the last site to fire raises :class:`_Stopped`, the one private stop exception,
  which the context swallows: the rest of the forward (later blocks, the final norm, the unembedding) never runs.
* :func:`run_to` — one stopped forward pass over a batch: ``{site name: kept activation}``. The bridge is also
  told to stop before the block after the last site (``stop_at_layer``, when every site is inside a block), so a
  site that never fires costs no more than the blocks up to it; a site that did not fire is an error.
* :func:`module_output` — the output *object* of a torch module (a bridge block as Hugging Face's layer loop passes
  it on: a tensor or a tuple), for a caller that replays it verbatim (ROME's v*, :func:`keyscope.editing.optimise.optimise_delta`);
  a PyTorch forward hook, removed in ``finally``.

A :class:`Site` may carry ``keep``, a function applied to the activation inside the hook (selecting the positions a
caller needs, detaching, adding it to a running statistic), so that a caller keeping a few positions holds no
whole ``(batch, pos, d)`` tensor. The activation is passed as the forward pass made it (attached to the graph when
gradients are on, as baukit's default ``detach=False``); the hooks return nothing, so the forward pass is unchanged.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Site:
    """A hook point to read (``name``, a TransformerLens hook name such as ``blocks.3.mlp.hook_post``) and what to
    keep of its activation: ``keep(activation)`` (default: the activation itself), computed inside the hook."""

    name: str
    keep: Callable[[torch.Tensor], Any] | None = None

    def kept(self, activation: torch.Tensor) -> Any:
        return activation if self.keep is None else self.keep(activation)


class UnknownSite(KeyError):
    """A site that is not a hook point of the model (a misspelt or another architecture's hook name)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Stopped(Exception):
    """Raised from the hook of the last site to fire, to end the forward pass (baukit's ``StopForward``); carries
    the :func:`capture` that raised it, so a nested capture never swallows another's stop."""

    def __init__(self, owner: object):
        super().__init__("every capture site fired")
        self.owner = owner


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def sites_of(sites: Iterable[str | Site]) -> tuple[Site, ...]:
    """``sites`` as :class:`Site`\\ s (a bare name keeps the whole activation); a name given twice is an error."""
    out = tuple(site if isinstance(site, Site) else Site(site) for site in sites)
    names = [site.name for site in out]
    if len(set(names)) != len(names):
        raise ValueError(f"capture sites given twice: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def check_sites(model, sites: Iterable[Site]) -> None:
    """Raise :class:`UnknownSite` for a site that is not in ``model.hook_dict``, naming the closest hook points."""
    hook_dict = model.hook_dict
    for site in sites:
        if site.name not in hook_dict:
            close = difflib.get_close_matches(site.name, list(hook_dict), n=3)
            raise UnknownSite(f"{site.name!r} is not a hook point of this model"
                              + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))


def last_block(sites: Iterable[Site]) -> int | None:
    """The highest block index among ``sites`` (``blocks.{L}.…``); ``None`` if any site is outside the blocks
    (embeddings, the final norm), whose place in the forward pass no block index bounds."""
    layers = [_BLOCK.match(site.name) for site in sites]
    if not layers or any(match is None for match in layers):
        return None
    return max(int(match.group(1)) for match in layers)


@contextmanager
def capture(model, sites: Iterable[str | Site], *, stop: bool = False) -> Iterator[dict[str, Any]]:
    """Inside the block, every forward pass of ``model`` keeps each site's activation (``site.keep`` of it) in the
    yielded dict under the site's name; a later pass overwrites the earlier one's.

    The hooks go through ``model.hooks`` (TransformerLens), in the order of ``sites`` and after every hook already
    on those points, and are removed when the block ends, normally or by an exception. With ``stop=True`` the
    forward pass is cut as soon as every site has fired (the first pass inside the block: the exception that cuts
    it ends the block too, as baukit's ``Trace(stop=True)``), so the caller's statements after that forward call
    do not run. Unknown sites raise :class:`UnknownSite` before anything runs.
    """
    sites = sites_of(sites)
    check_sites(model, sites)
    kept: dict[str, Any] = {}
    owner = object()
    fired: set[str] = set()

    def hook_of(site: Site):
        def hook(activation: torch.Tensor, hook) -> None:
            kept[site.name] = site.kept(activation)
            if stop:
                fired.add(site.name)
                if len(fired) == len(sites):
                    raise _Stopped(owner)

        return hook

    try:
        with model.hooks(fwd_hooks=[(site.name, hook_of(site)) for site in sites]):
            yield kept
    except _Stopped as stopped:
        if stopped.owner is not owner:
            raise


def run_to(model, input_ids: torch.Tensor, sites: Iterable[str | Site], attention_mask: torch.Tensor | None = None,
           *, stop: bool = True) -> dict[str, Any]:
    """One forward pass of ``model`` over ``input_ids`` ``(batch, pos)`` (with ``attention_mask``), returning
    ``{site name: kept activation}`` (:func:`capture`).

    With ``stop=True`` (the default) nothing runs after the last site: the capture's stop cuts the pass, and the
    bridge is asked to stop before the block after the highest block of the sites (``stop_at_layer``; none when a
    site is outside the blocks) with no output (``return_type=None``). Gradient mode is the caller's. A site that
    did not fire raises ``RuntimeError``.
    """
    sites = sites_of(sites)
    if not sites:
        raise ValueError("run_to needs at least one capture site")
    forward: dict[str, Any] = {}
    if stop:
        top = last_block(sites)
        if top is not None:
            forward["stop_at_layer"] = top + 1
        forward["return_type"] = None
    with capture(model, sites, stop=stop) as kept:
        model(input_ids, attention_mask=attention_mask, **forward)
    missing = [site.name for site in sites if site.name not in kept]
    if missing:
        raise RuntimeError(f"the hook(s) {missing} did not fire during the forward pass")
    return kept


@contextmanager
def module_output(module: torch.nn.Module, keep: Callable[[Any], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Inside the block, each forward pass through ``module`` leaves its output object (``keep`` of it) in the
    yielded dict under ``"output"`` — for a caller that needs what a torch module returns as such (a bridge block's
    tuple as Hugging Face's layer loop passes it on), not a hook point's tensor. A PyTorch forward hook that
    returns nothing (the output is unchanged; baukit's ``Trace`` on a module), removed when the block ends."""
    kept: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        kept["output"] = output if keep is None else keep(output)

    handle = module.register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()
