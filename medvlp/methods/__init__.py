"""Pre-training methods: ``base.VLPMethod`` and one file per method."""
