"""The request type and the interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Request:
    """n samples for one prompt, drawn with one seed (so the result ignores batch order)."""

    prompt_ids: list[int]
    n: int
    seed: int


class Backend(Protocol):
    name: str
    batch_size: int  # prompts per generate() call the runner should send

    def generate(self, requests: list[Request]) -> list[list[list[int]]]:
        """For each request, its n generated token-id lists (prompt excluded), in sample order."""
        ...

    def close(self) -> None: ...
