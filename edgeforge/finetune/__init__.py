"""edgeforge.finetune."""
