"""Seconds of ROME's v* optimisation: the plain loop against the ones that run the lower layers once and the
unchanged prefix of every prompt once.

    python benchmarks/bench_v_star.py                      # factworld, the tiny GPT-2 of the tests
    python benchmarks/bench_v_star.py --gpt2-small         # also a random GPT-2-small shape at layer 5
    python benchmarks/bench_v_star.py --smollm2            # also SmolLM2-135M (converted in the cache) at layer 5
    python benchmarks/bench_v_star.py --edits 5 --repeats 3

For each model and request, k* and the context prefixes are computed once; then
:func:`keyscope.editing.rome.compute_v_star` runs

* ``plain``  — every step a full forward pass with δ hooked into the layer's MLP output
  (``reuse_lower_layers=False, sdpa=False``);
* ``reuse``  — blocks ``0..L`` run once, later steps replay block ``L``'s output plus δ
  (``reuse_lower_layers=True, reuse_prefix=False, sdpa=False``);
* ``reuse+sdpa`` — the same with fused SDPA attention;
* ``reuse+prefix`` — also the positions before each subject's last token run once through blocks ``L+1..``, whose
  keys and values are cached; later steps run those blocks on the rest of each prompt only (the default; it runs
  Hugging Face's SDPA attention, ``keyscope.model.replay.PrefixCached``).

It prints the best of ``--repeats`` seconds per v* (mean over ``--edits`` requests), the v* steps, the largest
relative difference of v* against ``plain`` and the speed-up ``plain / variant``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_rome import REQUESTS, factworld_requests, save_gpt2_small  # noqa: E402
from keyscope.editing import rome  # noqa: E402
from keyscope.editing.prefixes import context_prefixes  # noqa: E402
from keyscope.editing.request import EditRequest  # noqa: E402
from keyscope.model.models import FACTWORLD, default_layer, load_model  # noqa: E402

VARIANTS = {
    "plain": dict(reuse_lower_layers=False, sdpa=False),
    "reuse": dict(reuse_lower_layers=True, reuse_prefix=False, sdpa=False),
    "reuse+sdpa": dict(reuse_lower_layers=True, reuse_prefix=False, sdpa=True),
    "reuse+prefix": dict(reuse_lower_layers=True, reuse_prefix=True),
}

#: The request of the real-model run (``--smollm2``).
SMOLLM2_REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")


def bench(label: str, model, layer: int, requests: list[EditRequest], repeats: int) -> list[str]:
    config = rome.ROMEConfig.for_model(model)
    prefixes = context_prefixes(model, config)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    steps: dict[str, list[int]] = {name: [] for name in VARIANTS}
    worst = dict.fromkeys(VARIANTS, 0.0)
    for request in requests:
        k_star = rome.compute_k_star(model, request, layer, prefixes)
        plain = None
        for name, options in VARIANTS.items():
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                v_star, trace = rome.compute_v_star(model, request, layer, k_star, prefixes, config, **options)
                best = min(best, time.perf_counter() - start)
            seconds[name].append(best)
            steps[name].append(len(trace.loss))
            plain = v_star if plain is None else plain
            worst[name] = max(worst[name], float((v_star - plain).norm() / plain.norm()))
    base = statistics.mean(seconds["plain"])
    rows = []
    for name in VARIANTS:
        mean = statistics.mean(seconds[name])
        n_steps = statistics.mean(steps[name])
        rows.append(f"| {label} | {layer} | {name} | {mean:.3f} | {mean / n_steps:.4f} | {n_steps:.1f} | "
                    f"{worst[name]:.1e} | {base / mean:.2f}× |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpt2-small", action="store_true", help="also a random GPT-2-small shape at layer 5")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at layer 5 (one request)")
    parser.add_argument("--no-tiny", action="store_true", help="skip factworld and the tiny GPT-2")
    args = parser.parse_args(argv)

    rows = ["| model | layer | loop | s per v* | s per step | steps | max ‖Δv*‖/‖v*‖ | speed-up |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        from tests.hf_tiny import save_tiny_checkpoint

        if not args.no_tiny:
            model = load_model(FACTWORLD)
            rows += bench("factworld", model, default_layer(model), factworld_requests(args.edits), args.repeats)
            model = load_model(str(save_tiny_checkpoint("gpt2", Path(tmp) / "tiny")))
            rows += bench("tiny GPT-2 (tests/hf_tiny.py, 3 layers)", model, 1, REQUESTS[: args.edits], args.repeats)
        if args.gpt2_small:
            model = load_model(str(save_gpt2_small(Path(tmp) / "gpt2-small")))
            rows += bench("random GPT-2-small shape (12 layers)", model, 5, REQUESTS[: args.edits], args.repeats)
        if args.smollm2:
            model = load_model("smollm2-135m")
            rows += bench("SmolLM2-135M", model, 5, [SMOLLM2_REQUEST], args.repeats)
    threads = torch.get_num_threads()
    print(f"device {model.cfg.device}, {threads} torch thread{'s' if threads > 1 else ''}")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
