"""Shapley values of interactions (SVV): DAE value functions, exact enumeration,
permutation sampling, the FastSHAP explainer and reference agreement. Ray-free."""
from .exact import MAX_EXACT_PLAYERS, coalition_masks, exact_shapley, shapley_weights
from .fastshap import (ExplainerNet, FastSHAPConfig, TrainedExplainer, efficient_normalise, explain,
                       game_endpoints, sample_coalitions, sample_sizes, train_explainer)
from .games import DAEGame, SubsetGame, interaction_players, user_game, user_items
from .permutation import PermutationEstimate, permutation_shapley, seeded_generator
from .reference import UserReference, agreement, reference_shapley, sample_users, user_reference

__all__ = [
    "MAX_EXACT_PLAYERS", "coalition_masks", "exact_shapley", "shapley_weights",
    "ExplainerNet", "FastSHAPConfig", "TrainedExplainer", "efficient_normalise", "explain",
    "game_endpoints", "sample_coalitions", "sample_sizes", "train_explainer",
    "DAEGame", "SubsetGame", "interaction_players", "user_game", "user_items",
    "PermutationEstimate", "permutation_shapley", "seeded_generator",
    "UserReference", "agreement", "reference_shapley", "sample_users", "user_reference",
]
