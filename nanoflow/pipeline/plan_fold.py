"""Plans written for the dense Llama layer, run on a layer where one op does the work of several,
or on a tensor-parallel layer (its all-reduces added to plans that do not name them).

The MoE block is one op (`moe`) where the dense layer has gate_up_gemm, act and down_gemm. A plan that
names those three (every built-in plan) is folded for such a layer: `moe` takes their cuts, stream
and SM budget, and is issued where the first of them was; the others' order entries are dropped. The
folded plan is then validated and checked against the layer's data flow like any other, so a fold
that would read rows before they are produced is rejected when the plan is loaded.
"""
from __future__ import annotations

import dataclasses

from nanoflow.pipeline.ops import COLLECTIVE_OPS, Op
from nanoflow.pipeline.plan import OrderEntry, Plan


def fold_plan(plan: Plan, layer_ops: list[Op]) -> Plan:
    """`plan` fitted to the layer: MoE ops in the place of the dense MLP ops they replace, then the
    tensor-parallel all-reduces added or dropped (fold_collectives)."""
    return fold_collectives(fold_moe(plan, layer_ops), layer_ops)


def fold_collectives(plan: Plan, layer_ops: list[Op]) -> Plan:
    """Plans written without the tensor-parallel all-reduces (pipeline.ops.COLLECTIVE_OPS) run on a
    layer that has them: each takes the cuts and stream of the op before it in the layer (its GEMM)
    and is issued right after each of that op's nano-ops. A plan written for tensor parallelism runs
    on one rank without them (their entries dropped). Unchanged when neither applies."""
    names = [op.name for op in layer_ops]
    mentioned = set(plan.ops) | {e.op for e in plan.order or ()}
    ops = dict(plan.ops)
    order = list(plan.order) if plan.order is not None else None
    changed = False
    for name in COLLECTIVE_OPS:
        if name in mentioned and name not in names:
            ops.pop(name, None)
            if order is not None:
                order = [e for e in order if e.op != name]
            changed = True
        elif name in names and name not in mentioned:
            before = names[names.index(name) - 1]
            ops[name] = plan.op_plan(before)
            if order is not None:
                order = [x for e in order for x in
                         ((e, OrderEntry(name, e.nano, e.layer_offset)) if e.op == before else (e,))]
            changed = True
    if not changed:
        return plan
    return dataclasses.replace(plan, ops=ops, order=None if order is None else tuple(order))


def fold_moe(plan: Plan, layer_ops: list[Op]) -> Plan:
    """`plan` with every op that `replaces` dense ops given their place (unchanged if none applies).

    The replaced ops must be cut the same way and run on the same stream (ValueError otherwise);
    the SM budget is the first replaced op's (gate_up_gemm: the largest GEMM of the three)."""
    names = {op.name for op in layer_ops}
    mentioned = set(plan.ops) | {e.op for e in plan.order or ()}
    ops = dict(plan.ops)
    order = list(plan.order) if plan.order is not None else None
    changed = False
    for op in layer_ops:
        replaced = [n for n in op.replaces if n not in names]
        if not replaced or op.name in mentioned or not any(n in mentioned for n in replaced):
            continue
        plans = {n: plan.op_plan(n) for n in replaced}
        first = plans[replaced[0]]
        for n, p in plans.items():
            if p.cuts != first.cuts or p.stream != first.stream:
                raise ValueError(
                    f"plan {plan.name!r}: {op.name!r} runs {', '.join(replaced)} as one op, so they need the "
                    f"same cuts and stream; {replaced[0]} has {first.cuts} on {first.stream!r}, "
                    f"{n} has {p.cuts} on {p.stream!r}")
        for n in replaced:
            ops.pop(n, None)
        ops[op.name] = first
        if order is not None:
            order = [OrderEntry(op.name, e.nano, e.layer_offset) if e.op == replaced[0] else e
                     for e in order if e.op not in replaced[1:]]
        changed = True
    if not changed:
        return plan
    return dataclasses.replace(plan, ops=ops, order=None if order is None else tuple(order))
