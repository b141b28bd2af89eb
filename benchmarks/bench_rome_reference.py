"""ROME's reference mode against a plain transcription of kmeng01/rome: the same ΔW, and the time of an edit
(issues #13, #25).

For each request: ``ΔW`` of ``ROMEConfig(reference=True)`` and of keyscope's default against the transcription
in ``tests/editing/test_rome.py`` (``_rome_reference``: ``rome_main``/``compute_u``/``compute_v`` written out on the
Hugging Face model and tokenizer), with the same hyper-parameters (the model's published ones,
``ROMEConfig.for_model``), the same prefixes (``context_prefixes``) and the same ``C⁻¹``; the cosine of
``ΔW`` (and for reference mode ``‖ΔW − ΔW_transcription‖ / ‖ΔW_transcription‖``), the seconds of each whole edit
and the v* steps each ran, on one torch thread (``torch.set_num_threads(1)``). The headline is the median over the
requests of keyscope-reference seconds / transcription seconds.

Tokens per second of the v* loop count the positions a step actually runs: the transcription's padded batch,
every position through every block (its backward pass through those above the edited layer); keyscope's the
positions from each prompt's subject last token on (its padded suffix, ``PrefixCached``) through the blocks
above the edited layer only (the once-per-edit pass of blocks ``0..L`` and of the prefixes is inside the loop's
seconds). The share of a v* step that is not matmul is read with ``torch.profiler`` from keyscope's own loop: the
self CPU time per operator of ``compute_v_star`` run to 3 and to 1 evaluation(s) (no early stop), the difference
halved: two full steps (forward, backward, Adam).

    python benchmarks/bench_rome_reference.py --tokenizer ../shared/data/tokenizer/gpt2   # random GPT-2-small
    python benchmarks/bench_rome_reference.py --model smollm2-135m --n 5 \\
        --out figures/benchmarks/bench_rome_reference_smollm2.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope._infra.atomic import write_text  # noqa: E402
from keyscope.editing.optimise import v_star_batch  # noqa: E402
from keyscope.editing.prefixes import context_prefixes  # noqa: E402
from keyscope.editing.request import EditRequest  # noqa: E402

#: CounterFact-like requests (the first three as CounterFact words them).
REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the", "Toko Yasuda", "piano"),
    ("{} plays the sport of", "Michael Jordan", "soccer"),
    ("The official language of {} is", "France", "German"),
]
#: ``--model`` default: a random GPT-2-small shape with the real GPT-2 tokenizer (``--tokenizer``).
RANDOM_GPT2 = "random-gpt2-small"
ENWIKI = ROOT.parent / "shared" / "data" / "enwiki_extract"
#: Operators counted as matmul (their self CPU time; ``linear``/``matmul`` dispatch to ``mm``/``addmm``, SDPA's
#: kernels and their backward are ``aten::_scaled_dot_product_*``).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::scaled_dot_product_attention", "aten::_scaled_dot_product")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def keyscope_tokens_per_step(model, request, prefixes, config) -> int:
    """Positions one step of keyscope's v* loop runs through the blocks above the layer: each row of the batch
    from its subject's last token on, padded to the longest (``S`` of ``PrefixCached``)."""

    batch = v_star_batch(model, request, prefixes, config)
    subject = batch.inject[..., 0].argmax(1)  # (batch,)
    lengths = batch.attention_mask.sum(1)  # (batch,)
    return batch.input_ids.shape[0] * int((lengths - subject).max())


def profile_step(model, request, layer: int, prefixes, config) -> tuple[float, float, float]:
    """``(non-matmul share, aten self CPU ms, wall ms)`` of one step of keyscope's v* loop: the per-operator self
    CPU time of ``compute_v_star`` to 3 evaluations minus that to 1, halved (the setup and the first forward
    cancel)."""
    from torch.profiler import ProfilerActivity, profile

    from keyscope.editing import rome

    k_star = rome.edit_key(model, request, layer, prefixes, config)
    totals = []
    for steps in (1, 3):
        options = replace(config, v_num_grad_steps=steps, early_stop_loss=None)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            rome.compute_v_star(model, request, layer, k_star, prefixes, options)
            wall = time.perf_counter() - start
        self_us: dict[str, float] = {}
        for event in prof.key_averages():
            self_us[event.key] = self_us.get(event.key, 0.0) + event.self_cpu_time_total
        totals.append((self_us, wall))
    (one, wall_one), (three, wall_three) = totals
    step = {key: (three.get(key, 0.0) - one.get(key, 0.0)) / 2 for key in three.keys() | one.keys()}
    total = sum(step.values())
    matmul = sum(us for key, us in step.items() if key.startswith(MATMUL_OPS))
    return 1 - matmul / total, total / 1e3, (wall_three - wall_one) / 2 * 1e3


def main(argv=None) -> int:
    from keyscope.analysis.covariance import KeyCovariance
    from keyscope.data.corpus import documents
    from keyscope.editing import rome
    from keyscope.model.models import load_model, model_dir, n_layers
    from tests.editing.test_rome import _rome_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=RANDOM_GPT2,
                        help=f"a keyscope model name (smollm2-135m) or {RANDOM_GPT2} (default)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "tokenizer" / "gpt2"),
                        help=f"the tokenizer of {RANDOM_GPT2}")
    parser.add_argument("--n", type=int, default=3, help=f"requests (at most {len(REQUESTS)})")
    parser.add_argument("--corpus", default=None,
                        help=f"text for C (default: {ENWIKI} for a real model if it exists, else factworld filler)")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="v* steps (default: the model's published value)")
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None, help="also write the printed lines to this file")
    args = parser.parse_args(argv)
    if args.model == RANDOM_GPT2 and not Path(args.tokenizer).is_dir():
        print(f"bench_rome_reference: error: no tokenizer directory at {args.tokenizer}", file=sys.stderr)
        return 2
    corpus = args.corpus or (str(ENWIKI) if args.model != RANDOM_GPT2 and ENWIKI.is_dir() else "factworld")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == RANDOM_GPT2:
            from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            path = Path(tmp) / RANDOM_GPT2
            GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tokenizer))).save_pretrained(path)
            tokenizer.save_pretrained(path)
            model = load_model(str(path), device="cpu")
            label = "random GPT-2-small shape, real GPT-2 tokenizer"
        else:
            model = load_model(args.model, device="cpu")
            path, label = model_dir(model), args.model
        cov = KeyCovariance(args.layer, n_tokens=args.cov_tokens, seq_len=128, progress=False)
        cov.fit(model, documents(corpus))
        cov.cholesky()
        C_inv = torch.linalg.inv(cov.C_ + cov.ridge_ * torch.eye(model.cfg.d_mlp, dtype=torch.float64))
        overrides = {} if args.steps is None else {"v_num_grad_steps": args.steps}
        config = rome.ROMEConfig.for_model(model, reference=True, **overrides)
        prefixes = context_prefixes(model, config)
        blocks = n_layers(model)
        emit(f"$ python benchmarks/bench_rome_reference.py {' '.join(sys.argv[1:] if argv is None else argv)}   "
             f"({os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start)")
        source = "published" if args.steps is None else "--steps"
        emit(f"{label}, layer {args.layer} of {blocks}, {len(prefixes)} prefixes, up to {config.v_num_grad_steps} "
             f"v* steps ({source}), C over {args.cov_tokens} tokens of {Path(corpus).name}, "
             f"{torch.get_num_threads()} torch thread, CPU")
        emit(f"{'request':<34}{'ΔW cos ref':>11}{'rel. diff':>10}{'ΔW cos def':>11}{'s ref':>7}{'s def':>7}{'s trans':>8}"
             f"{'ref/trans':>10}{'steps r/d/t':>13}{'v* tok/s ref':>13}{'v* tok/s trans':>15}")
        ratios, tokens = [], {}
        for template, subject, target in REQUESTS[: args.n]:
            request = EditRequest(template, subject, target)
            start = time.perf_counter()
            reference = rome.compute_edit(model, request, args.layer, cov, config, prefixes=prefixes)
            t_ref = time.perf_counter() - start
            start = time.perf_counter()
            default = rome.compute_edit(model, request, args.layer, cov, replace(config, reference=False),
                                        prefixes=prefixes)
            t_default = time.perf_counter() - start
            stats: dict = {}
            start = time.perf_counter()
            expected = _rome_reference(path, {"prompt": template, "subject": subject, "target_new": target},
                                       args.layer, C_inv, prefixes, config, stats)
            t_transcription = time.perf_counter() - start
            ratios.append(t_ref / t_transcription)
            ref_tokens = keyscope_tokens_per_step(model, request, prefixes, config)
            tokens[subject] = (ref_tokens, stats["tokens_per_step"])
            ref_rate = ref_tokens * reference.trace.n_steps / reference.trace.seconds_v_star
            trans_rate = stats["tokens_per_step"] * stats["steps"] / stats["seconds"]
            steps = f"{reference.trace.n_steps}/{default.trace.n_steps}/{stats['steps']}"
            difference = float((reference.delta_W.double() - expected).norm() / expected.norm())
            emit(f"{subject + ' → ' + target:<34}{cosine(reference.delta_W, expected):>11.6f}{difference:>10.1e}"
                 f"{cosine(default.delta_W, expected):>11.4f}{t_ref:>7.1f}{t_default:>7.1f}{t_transcription:>8.1f}"
                 f"{ratios[-1]:>9.2f}×{steps:>13}{ref_rate:>13.0f}{trans_rate:>15.0f}")
        emit(f"median keyscope reference / transcription: {statistics.median(ratios):.2f}× "
             f"(target ≤ 0.4×; {len(ratios)} requests)")
        emit("tokens per v* step (keyscope: suffix positions × blocks "
             f"{args.layer + 1}..{blocks - 1}; transcription: padded batch × all {blocks} blocks): "
             + ", ".join(f"{subject} {ref}×{blocks - args.layer - 1} vs {trans}×{blocks}"
                         for subject, (ref, trans) in tokens.items()))
        emit("(v* tok/s: tokens per step × steps / the v* seconds, keyscope's including its once-per-edit pass of "
             f"blocks 0..{args.layer} and of the prefixes)")
        template, subject, target = REQUESTS[0]
        share, aten_ms, wall_ms = profile_step(model, EditRequest(template, subject, target), args.layer,
                                               prefixes, config)
        emit(f"one keyscope reference v* step ({subject}; torch.profiler): {100 * share:.0f}% of the operators' self "
             f"CPU time is not matmul ({aten_ms:.0f} ms of operators, {wall_ms:.0f} ms wall under the profiler)")
    emit(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
