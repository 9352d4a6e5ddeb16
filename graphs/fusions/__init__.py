"""One fused op per module, each a Fusion: find -> check -> build (graphs/fusion.py)."""
