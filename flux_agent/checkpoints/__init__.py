"""Run checkpoints: versioned saves through the spool, integrity on every load, read your
own writes during outages."""
