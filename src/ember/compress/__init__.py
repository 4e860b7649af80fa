"""Make trained models smaller and faster: prune, distill, quantize, and the trade-off table."""
