"""Age estimation experiment (the paper's Figure 1)."""
