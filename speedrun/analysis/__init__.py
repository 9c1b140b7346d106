"""Analysis: the one reader of training logs (every dialect), loss curves, plots."""
