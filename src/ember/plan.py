"""``ember plan``: plan a run before it starts: parameters, FLOPs per item, memory per device under
each parallel layout, a recommended layout and micro-batch, and a throughput estimate.

Example::

    p = plan(load_recipe("recipes/gpt-tiny.yaml"), gpus=8, gpu_memory="80GB", gpu="h100")
    print(format_plan(p))
    p.recommended.strategy, p.recommended.micro_batch

The figures come from ``ember.training.memory`` (the layouts' formulas, ``plan``, and the
check every training run makes, ``check_memory``), which builds on one traced training step,
``ember.training.memory_trace``. They are computed there, below the training loop, because
training uses them too (``parallel.strategy: auto``, the memory check); this module is the
command's: the table, and the names a user of ``ember.plan`` imports.
"""

from __future__ import annotations

from ember.training.memory import (
    ASSUMED_MFU,
    HEADROOM,
    SKIP_MEMORY_CHECK,
    STRATEGIES,
    DeviceMemory,
    Layout,
    ModelFacts,
    Plan,
    check_memory,
    data_spec,
    format_bytes,
    layout_memory,
    model_facts,
    optimizer_bytes,
    parse_memory,
    plan,
    predicted_run_bytes,
)
from ember.training.memory_trace import Trace, allocator_peak, measure_step, reference_step

__all__ = [
    "ASSUMED_MFU",
    "HEADROOM",
    "SKIP_MEMORY_CHECK",
    "STRATEGIES",
    "DeviceMemory",
    "Layout",
    "ModelFacts",
    "Plan",
    "Trace",
    "allocator_peak",
    "check_memory",
    "data_spec",
    "format_bytes",
    "format_plan",
    "layout_memory",
    "measure_step",
    "model_facts",
    "optimizer_bytes",
    "parse_memory",
    "plan",
    "predicted_run_bytes",
    "reference_step",
]


def format_plan(p: Plan) -> str:
    """The plan as fixed-width text for the terminal."""
    head = [
        f"{p.model}: {p.params:,} parameters, {p.flops_per_item:.3g} training FLOPs per {p.item}, {p.precision}",
        f"{p.gpus} x {p.gpu} with {format_bytes(p.gpu_memory)} each; a layout fits at <= {HEADROOM:.0%} of it",
        "",
    ]
    cols = (
        "strategy",
        "dp",
        "tp",
        "pp",
        "micro",
        "params",
        "grads",
        "optim",
        "activ",
        "other",
        "total",
        "fits",
        "note",
    )
    rows = [cols]
    for lay in p.layouts:
        m = lay.memory
        rows.append(
            (
                lay.strategy,
                str(lay.dp),
                str(lay.tp),
                str(lay.pp),
                str(lay.micro_batch),
                *(format_bytes(v) for v in (m.params, m.grads, m.optimizer, m.activations, m.other, m.total)),
                "yes" if lay.fits else "no",
                lay.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
    lines = [
        "  ".join(c.rjust(w) if i and i < len(widths) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        + "  "
        + r[-1]
        for r in rows
    ]
    tail = [
        "",
        "total = the predicted peak per device; it is below the sum of the parts where gradients "
        "reuse memory the backward pass frees.",
    ]
    if p.recommended:
        r = p.recommended
        tail.append(
            f"recommended: {r.strategy} (dp={r.dp}, tp={r.tp}, pp={r.pp}), micro-batch {r.micro_batch}, "
            f"{format_bytes(r.memory.total)} per GPU; about {p.tokens_per_s_estimate:,.0f} {p.item}s/s "
            f"at {ASSUMED_MFU:.0%} MFU"
        )
    else:
        tail.append("recommended: none — no layout fits")
    return "\n".join(head + [line.rstrip() for line in lines] + tail + [f"note: {n}" for n in p.notes])
