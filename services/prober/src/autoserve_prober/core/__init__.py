"""The prober's pure core: targets, scheduling and outcome classification. No I/O here."""
