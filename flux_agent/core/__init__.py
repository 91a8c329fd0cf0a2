"""What every stage shares: settings, errors, the sealed row and spool records, canonical
JSON and digests, ids, timestamps, files. Pure: no I/O but the settings' files."""
