"""Where pipeline results go."""
