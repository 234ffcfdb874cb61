"""Active learning for semantic segmentation with sparse pixel labels."""
