"""The event API's route families, one module each, each built with only what it uses."""
