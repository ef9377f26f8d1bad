"""Node settings and logging."""
