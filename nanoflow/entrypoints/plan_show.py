"""`nanoflow plan show PLAN --out plan.png`: run a synthetic dense batch under a plan with the
executor's timeline on, and draw one layer's nano-ops on their streams over time (a Gantt chart like
NanoFlow's Figure 6: one row per stream, boxes coloured by resource class, labelled op.nano).

On a GPU the times are CUDA events (real overlap); on CPU the host clock (the nano-ops then run one
after another in issue order, so the chart shows the order, not overlap)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESOURCE_COLORS = {"compute": "#4C72B0", "memory": "#DD8452", "network": "#55A868"}


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("plan", metavar="PLAN",
                        help="plan JSON file, a built-in plan name (overlap-2, nano-4), 'sequential' or 'auto'")
    parser.add_argument("--out", default="plan.png", help="PNG to write (default: plan.png)")
    parser.add_argument("--model", default="default", help="model directory or preset (default: built-in tiny)")
    parser.add_argument("--load-format", default="auto", help="auto, safetensors or dummy (default: auto)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens of the dense batch (default: the engine's token budget)")
    parser.add_argument("--decode-fraction", type=float, default=0.5,
                        help="share of the batch that is decode rows (default: 0.5)")
    parser.add_argument("--context", type=int, default=None,
                        help="mean context of decode requests (default: 1024 on GPU, 64 on CPU)")
    parser.add_argument("--layer", type=int, default=None, help="layer to draw (default: the middle one)")
    parser.add_argument("--steps", type=int, default=2, help="warm-up steps before the recorded one")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    from nanoflow.config import EngineConfig
    from nanoflow.engine.engine import LLMEngine

    if args.batch_tokens is not None and args.batch_tokens <= 0:
        raise ValueError(f"--batch-tokens must be positive, got {args.batch_tokens}")
    config = EngineConfig(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                          max_num_batched_tokens=args.batch_tokens)
    engine = LLMEngine(config, stream_text=False)
    engine.set_plan(args.plan)
    from nanoflow.pipeline.workload_class import workload_class_for_engine
    context = args.context or (1024 if engine.device.type == "cuda" else 64)
    wl = workload_class_for_engine(engine, "mixed", decode_fraction=args.decode_fraction, context=context)
    entries = record_timeline(engine, wl, warmup=args.steps)
    model = Path(args.model).name if "/" in args.model else args.model
    title = (f"{engine.plan_name} on {model}: {wl.num_tokens} tokens ({wl.num_decode} decode, ctx "
             f"{wl.decode_context}), {_device_name(engine)}")
    out, stats = draw_timeline(entries, args.out, layer=args.layer, title=title)
    print(f"wrote {out}: layer {stats['layer']}, span {stats['span_ms']:.3f} ms; busy per stream: "
          + ", ".join(f"{s} {b:.3f} ms" for s, b in stats["busy_ms"].items())
          + f"; overlapped {stats['overlap_ms']:.3f} ms")
    return 0


def _device_name(engine) -> str:
    import torch
    return torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "CPU (host clock)"


def record_timeline(engine, wl, warmup: int = 2, plan=None) -> list[dict]:
    """Runs warm-up steps, then one recorded step of a synthetic batch of `wl`; the executor's
    timeline (every nano-op of every layer). `plan`: use it instead of the engine's current plan."""
    from nanoflow.autosearch.profile import dense_batch
    from nanoflow.pipeline.executor import make_executor
    runner = engine.runner
    old = runner.executor
    if plan is not None:
        runner.executor = make_executor(plan, engine.model.layers[0].ops, engine.device)
    try:
        with dense_batch(engine, wl) as batch:
            for _ in range(max(0, warmup)):
                runner.forward(batch, run_plan=True)
            runner.executor.record_timeline = True
            try:
                runner.forward(batch, run_plan=True)
                return runner.executor.timeline()
            finally:
                runner.executor.record_timeline = False
    finally:
        runner.executor = old


def _nano_labels(entries: list[dict]) -> list[str]:
    """'op.k' per entry, k = rank of its rows among the op's nano-ops of that layer."""
    by = {}
    for i, e in enumerate(entries):
        by.setdefault((e.get("layer", 0), e["op"]), []).append(i)
    labels = [""] * len(entries)
    for idx in by.values():
        for k, i in enumerate(sorted(idx, key=lambda i: (entries[i].get("lo", 0), entries[i]["start_ms"]))):
            e = entries[i]
            labels[i] = e.get("label") or f"{e['op']}.{e.get('nano', k)}"
    return labels


def draw_timeline(entries: list[dict], out: str | Path, layer: int | None = None, title: str = "",
                  slot_view: bool = False) -> tuple[Path, dict]:
    """Draws one layer's nano-ops (solid) and the other layers' nano-ops running meanwhile (faded).
    slot_view: the entries are one issue slot of a predicted schedule (layer 0 and -1, '@-1' marked),
    all drawn solid. Returns (path, stats: layer, span_ms, busy_ms per stream, overlap_ms)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ValueError(f"drawing needs matplotlib (pip install matplotlib): {exc}") from exc
    if not entries:
        raise ValueError("the timeline is empty (nothing ran)")
    labels = _nano_labels(entries)
    layers = sorted({e.get("layer", 0) for e in entries})
    if slot_view:
        layer = None
        chosen = list(range(len(entries)))
    else:
        if layer is None:
            layer = layers[len(layers) // 2]
        if layer not in layers:
            raise ValueError(f"layer {layer} is not in the timeline (layers {layers[0]}..{layers[-1]})")
        chosen = [i for i, e in enumerate(entries) if e.get("layer", 0) == layer]
    t0 = min(entries[i]["start_ms"] for i in chosen)
    t1 = max(entries[i]["end_ms"] for i in chosen)
    shown = [i for i, e in enumerate(entries) if e["end_ms"] > t0 and e["start_ms"] < t1 and
             (i in chosen or e["end_ms"] - e["start_ms"] > 0)]
    streams: list[str] = []
    for e in sorted(entries, key=lambda e: e.get("stream") != "compute"):
        if e["stream"] not in streams:
            streams.append(e["stream"])
    span = max(t1 - t0, 1e-9)
    fig, ax = plt.subplots(figsize=(14, 1.4 + 0.9 * len(streams)))
    chosen_set = set(chosen)
    for i in shown:
        e = entries[i]
        y = streams.index(e["stream"])
        start, width = max(e["start_ms"], t0) - t0, min(e["end_ms"], t1) - max(e["start_ms"], t0)
        mine = i in chosen_set
        color = RESOURCE_COLORS.get(e.get("resource"), "#8172B2")
        ax.barh(y, width, left=start, height=0.72, color=color, alpha=1.0 if mine else 0.3,
                edgecolor="black", linewidth=0.5, hatch=None if mine else "//")
        text = labels[i] + ("@-1" if slot_view and e.get("layer", 0) == -1 else "")
        if not mine:
            text = f"L{e.get('layer')}:" + text
        frac = width / span
        if frac >= 0.012:
            ax.text(start + width / 2, y, text, ha="center", va="center", fontsize=7,
                    rotation=0 if frac > 0.07 else 90, clip_on=True)
    ax.set_yticks(range(len(streams)), [f"{s} stream" for s in streams])
    ax.set_ylim(len(streams) - 0.4, -0.6)
    ax.set_xlim(0, span)
    ax.set_xlabel("ms" + (" (slot time, one layer's period)" if slot_view else f" from layer {layer}'s first nano-op"))
    handles = [Patch(facecolor=c, edgecolor="black", label=r) for r, c in RESOURCE_COLORS.items()
               if any(entries[i].get("resource") == r for i in shown)]
    if not slot_view and any(i not in chosen_set for i in shown):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="other layers"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    ax.set_title(title or "pipeline timeline", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    busy = {s: sum(min(entries[i]["end_ms"], t1) - max(entries[i]["start_ms"], t0)
                   for i in shown if entries[i]["stream"] == s) for s in streams}
    overlap = _overlap(entries, shown, t0, t1)
    return out, {"layer": layer, "span_ms": span, "busy_ms": busy, "overlap_ms": overlap}


def _overlap(entries: list[dict], shown: list[int], t0: float, t1: float) -> float:
    """Time within [t0, t1] when two or more streams are busy."""
    points = []
    for i in shown:
        e = entries[i]
        a, b = max(e["start_ms"], t0), min(e["end_ms"], t1)
        if b > a:
            points += [(a, 1, e["stream"]), (b, -1, e["stream"])]
    points.sort(key=lambda p: (p[0], p[1]))
    active: dict[str, int] = {}
    last, total = t0, 0.0
    for t, delta, s in points:
        if sum(1 for v in active.values() if v > 0) >= 2:
            total += t - last
        last = t
        active[s] = active.get(s, 0) + delta
    return total


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="nanoflow plan show", description=__doc__))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
