"""Names the fleet controller and `services.common` import from here; the drafting
policy itself is `services.engine.drafting`. Delete this file once they import from
there (or from the torch-free speedup module in `services.common`)."""

from services.engine.drafting.costs import BUCKETS, bucket
from services.engine.drafting.plan import LAYER_MODES
from services.engine.drafting.policy import best_length

__all__ = ["BUCKETS", "LAYER_MODES", "best_length", "bucket"]
