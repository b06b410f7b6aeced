"""edgeforge.finetune.techniques."""
