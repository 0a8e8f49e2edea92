"""Scale-out: where experts live across ranks (issue #14).

Placement planners (pure functions of a load, registered under kind ``placement``) and the
helpers that shard a MoE layer's experts over a ``torch.distributed`` process group. The
all-to-all dispatcher itself is ``moelab.ops.all_to_all`` (a dispatcher like ``local``).
"""
