"""The pure core: alert state as a fold over events, and the decisions; time is passed in."""
