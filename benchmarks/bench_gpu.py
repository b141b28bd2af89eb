"""Throughput of C and seconds per ROME edit on a random LLaMA-2-7B-width model built in memory (issue #16).

    python benchmarks/bench_gpu.py                    # LLaMA-2-7B width (d_model 4096, d_mlp 11008, 32 heads,
                                                      # 32 layers), bf16 on CUDA; needs ~14 GiB of GPU memory
    python benchmarks/bench_gpu.py --small            # a narrow 8-layer LLaMA for a CPU smoke run
    python benchmarks/bench_gpu.py --layer 5 --seq-len 512 --batch-size 16 --batches 20 --edits 1

Nothing is downloaded: ``transformers.LlamaForCausalLM`` is initialised at random directly on the device (in
``--dtype``, default bf16 on CUDA, float32 on CPU) and wrapped by ``TransformerBridge.boot_transformers`` with
``hf_model=``; the tokenizer is the word-level one of the tests (``tests/hf_tiny.py``) grown to LLaMA's
vocabulary size, and the corpus is random token windows of ``--seq-len`` (BOS first, BOS excluded from C).

Printed, each the best of ``--rounds`` interleaved rounds after ``--warmup`` untimed batches, in tokens per
second of counted (non-BOS) tokens:

* ``bare eager`` / ``bare sdpa``: the forward pass stopped at the layer-``--layer`` key
  (:func:`keyscope.analysis.keys.layer_keys`), with the bridge's eager attention and with
  :func:`keyscope.model.models.sdpa_attention`;
* ``fit``: :meth:`KeyCovariance.fit_batches` on the same batches (the stopped pass under SDPA plus the float32
  Gram product into the float64 sum) and its ratio to ``bare sdpa``;
* achieved TFLOP/s of the matmuls (projections, MLP, attention scores and mixing counted as dense
  ``2·m·n·k``; the fit adds the computed blocks of the Gram product), minutes for ROME's 44M tokens at the fit's
  rate;
* seconds per ROME edit at ``--layer`` (:func:`keyscope.editing.rome.compute_edit`, the model's default ROME settings,
  the covariance of the timed fit) and the peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
  maximum resident set).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope.analysis.covariance import GRAM_BLOCKS, KeyCovariance  # noqa: E402
from keyscope.analysis.keys import layer_keys  # noqa: E402
from keyscope.data.corpus import TokenBatch  # noqa: E402
from keyscope.editing import rome  # noqa: E402
from keyscope.editing.request import EditRequest  # noqa: E402
from keyscope.model.models import ModelSource, register_source, sdpa_attention  # noqa: E402

LLAMA_7B = {"d_model": 4096, "d_mlp": 11008, "n_heads": 32, "n_layers": 32, "vocab": 32000}
SMALL = {"d_model": 256, "d_mlp": 688, "n_heads": 4, "n_layers": 8, "vocab": 32000}
ROME_TOKENS = 44_000_000  # Wikipedia tokens of ROME's covariance (kmeng01/rome, layer_stats.py: 100,000 samples)
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")


def build_model(shape: dict, device: str, dtype: torch.dtype, workdir: Path):
    """A random LLaMA of ``shape`` on ``device`` in ``dtype``, as a keyscope-ready TransformerBridge; its tokenizer
    and config are written to ``workdir`` (the bridge reloads the tokenizer from there; no weights are saved)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.hf_tiny import TRAINING_TEXT, word_level_tokenizer

    known = sorted({w for text in TRAINING_TEXT for w in text.split()})
    filler = [f"w{i}" for i in range(shape["vocab"] - 4 - len(known))]
    word_level_tokenizer([" ".join(known), " ".join(filler)]).save_pretrained(workdir)
    tokenizer = AutoTokenizer.from_pretrained(workdir)  # a reloaded tokenizer knows its name_or_path
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_heads"], max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(workdir)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of 7B weights
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    hf.eval()
    model = TransformerBridge.boot_transformers("random-llama", hf_model=hf, tokenizer=tokenizer, device=device,
                                                dtype=dtype)
    model.eval()
    register_source(model, ModelSource(f"random LLaMA d_model {shape['d_model']}", card={}))  # as load_model does
    return model


def random_batches(model, n: int, batch_size: int, seq_len: int, seed: int = 0) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    batches = []
    for _ in range(n):
        ids = torch.randint(4, int(model.cfg.d_vocab), (batch_size, seq_len), generator=generator)  # (batch, pos)
        ids[:, 0] = bos
        mask = torch.ones_like(ids)
        key_mask = mask.bool()
        key_mask[:, 0] = False
        batches.append(TokenBatch(ids, mask, key_mask))
    return batches


def forward_flops(shape: dict, layer: int, seq_len: int) -> float:
    """Matmul FLOPs per token of the pass stopped at the layer-``layer`` key (down-projection skipped)."""
    d, m = shape["d_model"], shape["d_mlp"]
    attention = 2 * 4 * d * d + 2 * 2 * seq_len * d  # q, k, v, o projections; scores and mixing (dense count)
    return (layer + 1) * (attention + 2 * 2 * d * m) + layer * 2 * d * m  # gate and up everywhere, down below


def gram_flops(d_mlp: int) -> float:
    """FLOPs per key of the blocked upper-triangular Gram product of :meth:`KeyCovariance.add`."""
    n_blocks = GRAM_BLOCKS if d_mlp >= 256 else 1
    step = -(-d_mlp // n_blocks)
    return sum(2 * min(step, d_mlp - lo) * (d_mlp - lo) for lo in range(0, d_mlp, step))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, batches, device: str, warmup: int) -> tuple[float, int]:
    """Seconds and counted tokens of ``fn(batch)`` over ``batches[warmup:]`` (the first ``warmup`` untimed)."""
    for batch in batches[:warmup]:
        fn(batch)
    _sync(device)
    start = time.perf_counter()
    tokens = 0
    for batch in batches[warmup:]:
        fn(batch)
        tokens += batch.n_tokens
    _sync(device)
    return time.perf_counter() - start, tokens


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a narrow 8-layer LLaMA (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "float32"), help="default: bf16 on CUDA, else float32")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--seq-len", type=int, help="window length (default 512; --small: 128)")
    parser.add_argument("--batch-size", type=int, help="windows per batch (default 16; --small: 4)")
    parser.add_argument("--batches", type=int, help="timed batches per measurement (default 20; --small: 4)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is printed")
    parser.add_argument("--edits", type=int, default=1, help="ROME edits to time (0: none)")
    args = parser.parse_args(argv)
    for name, full, small in (("seq_len", 512, 128), ("batch_size", 16, 4), ("batches", 20, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)

    dtype_name = args.dtype or ("bf16" if args.device.startswith("cuda") else "float32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}[dtype_name]
    shape = SMALL if args.small else LLAMA_7B
    start = time.perf_counter()
    workdir = tempfile.TemporaryDirectory()
    model = build_model(shape, args.device, dtype, Path(workdir.name))
    print(f"random LLaMA: d_model {shape['d_model']}, d_mlp {shape['d_mlp']}, {shape['n_heads']} heads, "
          f"{shape['n_layers']} layers, {dtype_name} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
             f" ({torch.get_num_threads()} torch threads)")
          + f"; built in {time.perf_counter() - start:.1f} s")
    print(f"layer {args.layer}, windows of {args.seq_len} tokens, batches of {args.batch_size}, "
          f"best of {args.rounds} rounds of {args.batches} timed batches after {args.warmup} warm-up")
    batches = random_batches(model, args.warmup + args.batches, args.batch_size, args.seq_len)

    def bare(batch):
        layer_keys(model, batch.input_ids, batch.attention_mask, args.layer)

    def bare_sdpa(batch):
        with sdpa_attention(model):
            layer_keys(model, batch.input_ids, batch.attention_mask, args.layer)

    cov = KeyCovariance(args.layer, n_tokens=10**12, progress=False)

    def fit(batch):
        cov.fit_batches(model, [batch])

    per_token = forward_flops(shape, args.layer, args.seq_len)
    measured = {"bare eager": (bare, per_token), "bare sdpa": (bare_sdpa, per_token),
                "fit": (fit, per_token + gram_flops(shape["d_mlp"]))}
    rates = dict.fromkeys(measured, 0.0)
    for _ in range(args.rounds):  # interleaved rounds, best of each: drifts of a shared machine hit all alike
        for name, (fn, _flops) in measured.items():
            seconds, tokens = timed(fn, batches, args.device, args.warmup)
            rates[name] = max(rates[name], tokens / seconds)
    for name, (_fn, flops) in measured.items():
        print(f"{name:>10}: {rates[name]:>12,.0f} tokens/s  {rates[name] * flops / 1e12:8.2f} TFLOP/s")
    print(f"fit / bare sdpa: {rates['fit'] / rates['bare sdpa']:.3f}; fit / bare eager: "
          f"{rates['fit'] / rates['bare eager']:.3f}")
    print(f"C over {ROME_TOKENS / 1e6:.0f}M tokens at the fit's rate: {ROME_TOKENS / rates['fit'] / 60:.1f} min")

    if args.edits:
        config = rome.ROMEConfig.for_model(model)
        times, steps = [], []
        for _ in range(args.edits):
            _sync(args.device)
            start = time.perf_counter()
            edit = rome.compute_edit(model, REQUEST, layer=args.layer, cov=cov, config=config)
            _sync(args.device)
            times.append(time.perf_counter() - start)
            steps.append(edit.trace.n_steps)
        print(f"ROME edit at layer {args.layer}: {min(times):.2f} s (best of {args.edits}; {steps[0]} v* steps)")
    print(f"peak memory: {peak_memory_gib(args.device):.2f} GiB")


if __name__ == "__main__":
    main()
