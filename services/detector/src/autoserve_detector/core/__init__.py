"""The detector's pure core: a fold over probe results and container observations."""
