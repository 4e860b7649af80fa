"""Training: the one loop (``loop.py``) and the pieces it calls."""
