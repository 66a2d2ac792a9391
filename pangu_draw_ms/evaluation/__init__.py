"""Evaluation of generated images: FID, Inception Score, CLIP-scores, and the runs that draw the images."""
