"""Queue ordering: random, similar, dissimilar and temporal orders of a project's tasks.

Pure algorithms on arrays (:func:`order_pool`, :func:`batches`, :func:`extend_order`) and the
project-level plan on stored tasks and features (:func:`build_order`, :func:`place_new_tasks`).
See ``docs/ordering.md``.
"""

from backend.ordering.extend import extend_order
from backend.ordering.greedy import GreedyResult, exact_sq_distances, greedy_order
from backend.ordering.plan import (
    OrderPlan,
    build_order,
    file_name_key,
    load_plan,
    place_new_tasks,
    set_view_id,
    temporal_keys,
)
from backend.ordering.ranks import RANK_GAP, ranks_for, rerank
from backend.ordering.strategies import (
    FEATURE_STRATEGIES,
    STRATEGIES,
    OrderResult,
    Strategy,
    batches,
    natural_key,
    order_pool,
    order_pool_result,
    reduce_dim,
    seed_indices,
)

__all__ = [
    "FEATURE_STRATEGIES",
    "RANK_GAP",
    "STRATEGIES",
    "GreedyResult",
    "OrderPlan",
    "OrderResult",
    "Strategy",
    "batches",
    "build_order",
    "exact_sq_distances",
    "extend_order",
    "file_name_key",
    "greedy_order",
    "load_plan",
    "natural_key",
    "order_pool",
    "order_pool_result",
    "place_new_tasks",
    "ranks_for",
    "reduce_dim",
    "rerank",
    "seed_indices",
    "set_view_id",
    "temporal_keys",
]
