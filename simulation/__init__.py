"""``uniroute simulate``: a budget period of traffic replayed through the real chat service (docs/PACING.md)."""
