"""MEMIT writing ``--n`` facts in one batch against ``--n`` single ROME edits, on factworld, in one run.

    PYTHONPATH=. python benchmarks/bench_memit.py            # 100 facts
    PYTHONPATH=. python benchmarks/bench_memit.py --n 20

Both methods edit the same ``--n`` known factworld facts (drawn with ``--seed``) from the unedited model, with
factworld's settings (:meth:`keyscope.editing.rome.ROMEConfig.for_model`, :meth:`keyscope.editing.memit.MEMITConfig.for_model`:
the card's ``rome_config`` and ``memit_config``) and the same context prefixes, sampled once. ROME computes one
edit per fact (``ROMEEditor.compute`` of one request, as ``keyscope evaluate`` runs it); MEMIT one edit of all of
them (``MEMITEditor.compute``: a z optimisation per fact at the last layer, then one update per layer). The
covariances are loaded (or estimated) before the clocks start. Prints the seconds of each, their ratio, and the
mean v*/z steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from keyscope.analysis.covariance import load_or_compute_covariance
    from keyscope.analysis.predictions import sample_known_facts
    from keyscope.data.datasets import load_facts
    from keyscope.editing.base import make_editor, prepare_context
    from keyscope.editing.memit import MEMITConfig
    from keyscope.editing.request import EditRequest
    from keyscope.model.models import default_layer, load_model

    torch.manual_seed(args.seed)
    model = load_model()
    layer = default_layer(model)
    chosen, _ = sample_known_facts(model, load_facts("factworld"), args.n, args.seed)
    requests = [EditRequest(f.prompt, f.subject, f.target_new, f.target_true) for f in chosen]
    covs = {L: load_or_compute_covariance(model, L, progress=False)
            for L in {layer, *MEMITConfig.for_model(model).layers}}
    context = prepare_context(model, layer, covs[layer], ["rome", "memit"], load_covariance=covs.__getitem__)
    rome_editor, memit_editor = make_editor("rome", model, context), make_editor("memit", model, context)

    start = time.perf_counter()
    rome_edits = [rome_editor.compute([r]) for r in requests]
    rome_seconds = time.perf_counter() - start
    start = time.perf_counter()
    memit_edit = memit_editor.compute(requests)
    memit_seconds = time.perf_counter() - start

    result = {
        "n": len(requests), "model": "factworld", "threads": torch.get_num_threads(),
        "rome_seconds": round(rome_seconds, 2), "memit_seconds": round(memit_seconds, 2),
        "ratio_rome_over_memit": round(rome_seconds / memit_seconds, 3),
        "rome_mean_v_steps": sum(e.edits[0].trace.n_steps for e in rome_edits) / len(rome_edits),
        "memit_mean_z_steps": sum(t.n_steps for t in memit_edit.traces) / len(memit_edit.traces),
        "memit_layers": list(memit_edit.layers),
    }
    print(f"{len(requests)} facts on factworld ({torch.get_num_threads()} threads): ROME one by one "
          f"{rome_seconds:.1f} s, MEMIT in one batch {memit_seconds:.1f} s, ratio ROME/MEMIT "
          f"{rome_seconds / memit_seconds:.2f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
