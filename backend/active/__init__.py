"""Box-level active learning (Desai & Balasubramanian): query the most informative predicted
boxes instead of whole images, and train on partly labelled images with noisy boxes damped.

* :mod:`backend.active.pool` — the box pool U_B a model predicts, with class distributions and
  box features;
* :mod:`backend.active.measures` — random, uncertainty, entropy, margin and core-set, per box and
  per image, and the top-K selection;
* :mod:`backend.active.answers` — one rule for what an answer makes of the queried boxes;
* :mod:`backend.active.campaign` — what is labelled so far, and L_I as training samples.
"""

from backend.active.answers import QueryAnswers, noisy_box_weights, resolve_queries
from backend.active.campaign import BoxCampaign, CampaignCounts, LabeledState
from backend.active.measures import (
    MEASURES,
    Measure,
    box_scores,
    check_measure,
    image_scores,
    select_boxes,
    select_images,
)
from backend.active.pool import BoxPool, box_features_at, pool_members, predict_pool

__all__ = [
    "MEASURES",
    "BoxCampaign",
    "BoxPool",
    "CampaignCounts",
    "LabeledState",
    "Measure",
    "QueryAnswers",
    "box_features_at",
    "box_scores",
    "check_measure",
    "image_scores",
    "noisy_box_weights",
    "pool_members",
    "predict_pool",
    "resolve_queries",
    "select_boxes",
    "select_images",
]
