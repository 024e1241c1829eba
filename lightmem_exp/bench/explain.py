"""What would close each goal when it fails; filled from what the bench runs showed. Appended to the reason."""

from __future__ import annotations

EXPLANATIONS: dict[str, str] = {}
