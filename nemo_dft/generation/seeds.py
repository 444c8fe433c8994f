"""Per-example seeds, derived from the base seed and the example id.

A seed that depends only on (base seed, id, resample round) makes the samples of an example
independent of the shard it lands in and of batch order.
"""

from __future__ import annotations

import hashlib
import json

SEED_RULE = "int(sha256(json.dumps([base_seed, id, round])).hexdigest()[:8], 16) % 2**31"


def example_seed(base_seed: int, example_id: int | str, round_index: int = 0) -> int:
    """Seed of the request for ``example_id``; round 0 is the first pass, later rounds resample.

    json.dumps keeps id 1 and id "1" apart; 31 bits fit every backend's seed type.
    """
    blob = json.dumps([int(base_seed), example_id, int(round_index)]).encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16) % 2**31
