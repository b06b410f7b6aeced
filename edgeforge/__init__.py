"""edgeforge: take a language model to an edge device: plan, distill, fine-tune, export, benchmark, ship."""

__version__ = "0.1.0"
