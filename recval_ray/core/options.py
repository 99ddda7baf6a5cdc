"""The options of the data, split and synthetic-log stages: dataclasses the core reads and
the job config (:mod:`recval_ray.config`) validates and re-exports. The core owns them so that
no core module imports the top-level config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

DataFormat = Literal["parquet", "csv", "tsv", "movielens-100k", "movielens-1m", "lightgcn",
                     "amazon-json", "synthetic"]


@dataclass
class Columns:
    user: str = "user_id"
    item: str = "item_id"
    rating: Optional[str] = None
    timestamp: Optional[str] = None


@dataclass
class SyntheticConfig:
    """Low-rank users x items with popularity skew; see :mod:`recval_ray.core.synthetic`."""
    n_users: int = 300
    n_items: int = 400
    interactions_per_user: int = 30
    rank: int = 8
    popularity_exponent: float = 1.0
    seed: int = 0


@dataclass
class DataConfig:
    format: DataFormat = "synthetic"
    path: Optional[str] = None
    columns: Columns = field(default_factory=Columns)
    delimiter: Optional[str] = None
    header: bool = True
    implicit: Union[Literal["all"], float] = "all"
    min_user: int = 0
    min_item: int = 0
    duplicates: Literal["keep-last", "keep-first", "error"] = "keep-last"
    hidden_files: Literal["skip", "read"] = "skip"   # files/folders named .* or _* in an input folder
    strict: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SplitConfig:
    """``random``: interactions at random; ``user-ratio``: within each user;
    ``user-time-ratio``: within each user by time (the last ``ratios[-1]`` to test, the
    ``ratios[1]`` before them to valid); ``leave-last``: each user's last ``n_test`` (and
    ``n_valid``) by timestamp; ``given``: the input's own split (LightGCN / Amazon files)."""
    kind: Literal["random", "user-ratio", "user-time-ratio", "leave-last", "given"] = "user-ratio"
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    rounding: Literal["half-up", "floor"] = "half-up"
    n_valid: int = 1
    n_test: int = 1
    valid_from_train: float = 0.1
    seed: int = 0

    def plans_validation(self) -> Optional[bool]:
        """Whether this split gives a validation part: ``False`` when it cannot (two ratios or a
        zero validation share, ``n_valid: 0``), ``None`` when only the data can tell (``given``
        without ``valid_from_train``: the input's own valid rows), else ``True``."""
        if self.kind == "leave-last":
            return self.n_valid > 0
        if self.kind == "given":
            return True if self.valid_from_train > 0 else None
        return len(self.ratios) == 3 and float(self.ratios[1]) > 0
