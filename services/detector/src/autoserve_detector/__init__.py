"""AutoServe detector: failure classification, thresholds, and history rebuilt by replay."""
