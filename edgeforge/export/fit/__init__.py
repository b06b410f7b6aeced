"""Quantize to a byte budget: a per-tensor-group GGUF mix chosen from measured sensitivity.

- ``groups``: which tensors move together (one layer's attention, one layer's MLP, the embedding, the output) and
  their exact bytes at each candidate type, llama.cpp's shape fallbacks included.
- ``sensitivity``: the mean-KL cost of each group alone going down to each type, measured on real files written
  by ``llama-quantize --tensor-type`` and run in llama.cpp; cached by the model's content.
- ``allocate``: the type per group that minimises the summed cost within the budget (exact multiple-choice
  knapsack over bytes).
- ``mix``: the whole fit, and the override list ``llama-quantize`` writes the file with.
"""
