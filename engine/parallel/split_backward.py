"""A stage's backward in two passes: input gradients now (B), weight gradients later (W).

Zero-bubble pipeline schedules run B as soon as the next stage's gradient arrives, because the
previous stage waits for its result, and W whenever the rank would otherwise idle. This works on
any autograd graph, with no change to the layers (the approach of torch.distributed.pipelining's
``stage_backward_input`` / ``stage_backward_weight``):

- B is ``torch.autograd.grad(roots, input, retain_graph=True)``. The engine runs only what the
  input's gradient needs: a matmul node computes the gradient of its activation operand and
  skips the weight GEMM, and no parameter's gradient is accumulated. Pre-hooks record the
  gradient arriving at each *frontier* node: the first node on the input's side of the graph
  that a parameter feeds, walking from the parameter towards the loss.
- W is one ``torch.autograd.backward`` per group of parameters that share frontier nodes,
  started at those nodes with the recorded gradients and asked only for the group's parameters.
  The engine skips every edge that leads to no requested parameter, so W never recomputes the
  input-gradient chain; the gradients reach ``.grad`` through AccumulateGrad, which fires the
  post-accumulate hooks that feed Loom's gradient buckets just as a plain backward does.

A stage whose input needs no gradient (the first) has nothing for B to compute: its W is the
whole backward. A node that runs in both passes runs its backward twice (its saved tensors are
kept for W), so custom autograd Functions on the frontier must tolerate that.
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


class SplitBackward:
    """B of one microbatch of one stage, run on construction; ``weights()`` runs its W later.

    roots: tensors to backpropagate from; grads: their gradients (None for a scalar: 1).
    input: the stage input (a leaf that requires grad), or None.
    """

    def __init__(self, roots: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                 input: Optional[torch.Tensor]):
        self.input_grad: Optional[torch.Tensor] = None
        self._groups: list[tuple[list[torch.Tensor], list[Node], list]] = []
        self._whole = (list(roots), list(grads))  # W's work where B has none
        if not roots or input is None or not input.requires_grad:
            return
        grads = [torch.ones_like(r) if g is None else g for r, g in zip(roots, grads)]
        root_nodes = [r.grad_fn for r in roots]
        parents = _parents(root_nodes)
        input_node = get_gradient_edge(input).node
        if input_node not in parents:  # the output does not depend on the input
            self.input_grad = torch.zeros_like(input)
            return
        self._whole = None
        trunk = _descendants(input_node, parents) - {input_node}
        root_edges = defaultdict(list)
        for r, g in zip(roots, grads):
            root_edges[r.grad_fn].append((GradientEdge(r.grad_fn, r.output_nr), g))
        captured: dict[Node, tuple] = {}
        self._groups = _group(parents, trunk, root_edges, input_node)
        hooks = [node.register_prehook(_recorder(captured, node))
                 for _, frontier, _ in self._groups for node in frontier]
        try:
            self.input_grad, = torch.autograd.grad(roots, [input], grads, retain_graph=True, allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()
        if self.input_grad is None:
            self.input_grad = torch.zeros_like(input)
        self._captured = captured

    def weights(self) -> None:
        """W: accumulate every parameter's gradient into ``.grad`` (firing its hooks); frees the graph."""
        if self._whole is not None:
            roots, grads = self._whole
            self._whole = None
            if roots:
                torch.autograd.backward(roots, grads)
            return
        captured, self._captured = self._captured, {}
        for params, frontier, given in self._groups:
            edges, grads = [], []
            for node in frontier:
                for i, g in enumerate(captured.get(node, ())):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            for edge, g in given:
                edges.append(edge)
                grads.append(g)
            if not edges:
                continue
            # A frontier node reached again from another start of the group would add to the
            # gradient it already recorded in full: give it exactly the recorded one.
            clamps = [node.register_prehook(lambda _, g=captured[node]: g)
                      for node in frontier if len(frontier) > 1 and node in captured]
            try:
                # Kept: two groups may share nodes off the input's path (freed with the graph).
                torch.autograd.backward(edges, grads, inputs=params, retain_graph=True)
            finally:
                for clamp in clamps:
                    clamp.remove()
        self._groups = []


def _recorder(captured: dict, node: Node):
    def record(grad_outputs):
        captured[node] = tuple(grad_outputs)
    return record


def _parents(roots: list[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from ``roots`` -> the nodes that feed it gradients (its users in forward)."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    queue = deque(n for n in dict.fromkeys(roots) if n is not None)
    seen = set(queue)
    for node in queue:
        parents.setdefault(node, [])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents[child].append(node)
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return parents


def _descendants(start: Node, parents: dict[Node, list[Node]]) -> set[Node]:
    """``start`` and every node whose forward output depends on it."""
    out, queue = {start}, deque([start])
    while queue:
        for parent in parents[queue.popleft()]:
            if parent not in out:
                out.add(parent)
                queue.append(parent)
    return out


def _group(parents: dict, trunk: set, root_edges: dict, input_node: Node) -> list:
    """[(params, frontier nodes, root edges with their gradients)], groups with disjoint frontiers.

    Walking from a parameter towards the roots, the walk stops at trunk nodes (they run in B,
    whose pre-hooks record their gradients) and passes through the others; a root tensor met on
    the way contributes its own gradient, which B never propagates there.
    """
    groups: list[dict] = []
    owner: dict[Node, dict] = {}
    for leaf in parents:
        if leaf is input_node or not hasattr(leaf, "variable"):
            continue  # only AccumulateGrad nodes hold a .variable: the parameters (and other leaves)
        # Ordered (a dict), so that every replica of a stage sums in the same order: TP-replicated
        # weights must stay bitwise equal.
        frontier, given, queue, seen = {}, [], deque([leaf]), {leaf}
        while queue:
            node = queue.popleft()
            given += root_edges.get(node, []) if node not in trunk else []
            for parent in parents[node]:
                if parent in seen:
                    continue
                seen.add(parent)
                if parent in trunk:
                    frontier[parent] = None
                else:
                    queue.append(parent)
        mine = {"params": [leaf.variable], "frontier": frontier, "given": given}
        for node in frontier:  # merge with every group sharing a frontier node
            other = owner.get(node)
            if other is not None and other is not mine:
                mine["params"] += other["params"]
                mine["frontier"] = {**other["frontier"], **mine["frontier"]}
                mine["given"] += [e for e in other["given"] if e[0] not in {g[0] for g in mine["given"]}]
                # By identity: ``list.remove`` compares dicts by value, tensors and all.
                groups = [g for g in groups if g is not other]
                for n in other["frontier"]:
                    owner[n] = mine
        for node in mine["frontier"]:
            owner[node] = mine
        groups.append(mine)
    return [(g["params"], list(g["frontier"]), g["given"]) for g in groups]
