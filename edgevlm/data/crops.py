"""Multi-view image layouts (torch-free): families register functions img, spec -> (V, 3, H, W)."""
from __future__ import annotations
